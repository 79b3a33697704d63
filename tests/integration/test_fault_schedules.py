"""CI's short run of the seeded fault schedules (tests/faults; `make faults` runs a longer one).

Each seed is one schedule against real processes: an inference service on a state directory on
a small tmpfs (when the tests run as root), raw wire-format writers, trainer processes, kill -9,
restarts, a full disk. Every invariant of tests/faults/model.py must hold after every step. The
seeds are chosen so that together they exercise every kind of fault (checked below).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import run_schedule
from tests.faults.schedule import FEATURES, features, generate

STEPS = 8
SEEDS = (168, 1378, 391)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_fault_schedule_keeps_every_invariant(seed: int, tmp_path: Path) -> None:
    schedule = generate(seed, STEPS)
    result = run_schedule(schedule, tmp_path / f"seed-{seed}")  # prints every step and answer
    if result.violations:
        replay = f"replay: python -m tests.faults --seed {seed} --steps {STEPS} --keep"
        pytest.fail("\n".join([*result.violations, replay]), pytrace=False)
    assert result.steps == len(schedule.steps)


def test_the_ci_seeds_exercise_every_kind_of_fault() -> None:
    covered = set().union(*(features(generate(seed, STEPS)) for seed in SEEDS))
    missing = set(FEATURES) - covered - {"kill-trainer"}  # (a trainer is killed at teardown)
    assert not missing, f"the CI seeds no longer exercise {sorted(missing)}: choose others"
