"""Run one fault schedule against real processes and check the invariants after every step.

`run_schedule(schedule, root, out)` starts an inference service on a state directory (a small
tmpfs when it can mount one), executes the steps one by one, and after each (a quiet point: no
push of the harness in flight) checks what `tests/faults/model.py` lists. Each violation is
reported once per schedule, with the seed and the step it was first seen after.

The steps act in `leases.py`, `pushes.py` and `processes.py`, the checks in `invariants.py`:
each a mixin of `Run`, which holds the state they share.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults import steps
from tests.faults.cluster import Cluster, ServiceDown
from tests.faults.invariants import Abort, Invariants
from tests.faults.leases import Leases
from tests.faults.model import Ledger
from tests.faults.processes import Processes
from tests.faults.pushes import IDLE_S, Pushes
from tests.faults.schedule import WRITERS, Schedule
from tests.faults.steps import Step, writer_id
from tests.faults.writer import RawWriter, Stream


@dataclass
class Result:
    seed: int
    steps: int
    violations: list[str] = field(default_factory=list)
    root: Path | None = None


class Run(Invariants, Leases, Pushes, Processes):
    """One schedule's run: its state, the report of what it finds, and the loop over its steps
    (the steps themselves are in leases.py, pushes.py and processes.py; the checks in
    invariants.py)."""

    def __init__(self, schedule: Schedule, root: Path, out: Callable[[str], None]) -> None:
        self.schedule = schedule
        self.out = out
        self.cluster = Cluster(root, schedule.relay, IDLE_S)
        self.ledger = Ledger()
        self.writers: dict[int, RawWriter] = {}
        self.violations: list[str] = []
        self._keys: set[str] = set()
        self.step = -1
        self.steps_run = 0
        self._streams: list[Stream] = []
        self._log_offsets: dict[Path, int] = {}
        self._trainer_acks: dict[int, int] = {}
        self._awaiting_grant: set[str] = set()  # trainers started, not yet seen granted
        self._killed: set[int] = set()  # pids of trainer processes the harness killed
        self._exits_seen: set[int] = set()
        self._tmp_seen: dict[str, tuple[int, int]] = {}
        self._files: dict[tuple[str, int, int], tuple[int, str, bytes] | str] = {}

    # -- reporting -----------------------------------------------------------------------------

    def _where(self) -> str:
        planned = self.schedule.steps
        if self.step < 0:
            return "start"
        if self.step >= len(planned):
            return "end"
        return f"step {self.step} [{planned[self.step].describe()}]"

    def violate(self, key: str, message: str) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        text = f"seed={self.schedule.seed} {self._where()}: {message}"
        self.violations.append(text)
        self.out(f"    VIOLATION {text}")

    def note(self, message: str) -> None:
        self.out(f"    {message}")

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Result:
        try:
            if not self.cluster.disk.mount():
                self.note(
                    f"no tmpfs for the state directory ({self.cluster.disk.mount_error}): the "
                    "full-disk steps are skipped"
                )
            self.cluster.start_service()
            self.writers = {
                i: RawWriter(writer_id(i), self.cluster.sync_address) for i in range(WRITERS)
            }
            self.check()
            for index, step in enumerate(self.schedule.steps):
                self.step = index
                self.out(f"  step {index}: {step.describe()}")
                self.execute(step)
                self.steps_run += 1
                self.check()
            self.step = len(self.schedule.steps)
            self.out("  end: restart-service (SIGTERM), then the last checks")
            self.restart(graceful=True)
            self.check(final=True)
        except ServiceDown as exc:
            self.violate("service-down", str(exc))
        except Abort:
            pass
        except Exception:  # a bug of the harness: reported like a violation, the run goes on
            self.violate("harness-error", f"the harness failed:\n{traceback.format_exc()}")
        finally:
            for stream in self._streams:
                stream.cancel()
            for writer in self.writers.values():
                writer.close()
            for problem in self.cluster.close():
                self.out(f"  WARNING {problem}")
        return Result(self.schedule.seed, self.steps_run, self.violations)

    def execute(self, step: Step) -> None:
        match step:
            case steps.Push():
                self.push(step)
            case steps.Acquire():
                self.acquire(step.writer)
            case steps.AcquireRace():
                self.acquire_race(step)
            case steps.Concurrent():
                self.concurrent(step)
            case steps.Burst():
                self.burst(step)
            case steps.Stall():
                self.stall(step)
            case steps.KillService():
                self.kill_service(step)
            case steps.KillRelay():
                self.kill_relay(step)
            case steps.StartTrainer():
                self.start_trainer(step.trainer)
            case steps.AwaitTrainer():
                self.await_trainer(step)
            case steps.KillTrainer():
                self.kill_trainer(step.trainer)
            case steps.FillDisk():
                self.set_disk_full(True)
            case steps.FreeDisk():
                self.set_disk_full(False)


def run_schedule(schedule: Schedule, root: Path, out: Callable[[str], None] = print) -> Result:
    out(schedule.describe())
    root.mkdir(parents=True, exist_ok=True)
    result = Run(schedule, root, out).run()
    result.root = root
    out(
        f"schedule seed={schedule.seed}: {result.steps} steps, "
        f"{len(result.violations)} violation(s)"
    )
    return result
