"""A seeded fault-injection suite for the weight sync.

From a seed, `schedule.py` draws a bounded schedule of steps: AcquireWriter calls (alone and
racing), pushes from raw wire-format writers (full or delta, cut after the header, mid-payload,
before the commit or after it), stalled pushes with other writers acting meanwhile, concurrent
pushes, real trainer processes, kill -9 of the inference service, its sync relay and trainers,
restarts on the same state directory, and a full state disk (a small tmpfs). `harness.py` runs
it against real processes and checks the invariants of `model.py` after every step.

The files by role: `steps.py` (what each step is), `schedule.py` (choosing them), `harness.py`
(the run), `leases.py`, `pushes.py` and `processes.py` (carrying the steps out), `invariants.py`
(the checks), `model.py` (the ledger they check against), `cluster.py` and `disk.py` (the
processes and the state disk), `writer.py` (a raw wire-format writer), `stamp.py` (the model).

    python -m tests.faults --seed 7          # one schedule, every step and answer printed
    python -m tests.faults --schedules 50    # seeds 1..50 (`make faults`)

The last line is `faults schedules=N steps=S violations=V`; each violation names its seed and
step, so `python -m tests.faults --seed N` replays it.
"""
