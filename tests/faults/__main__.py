"""`python -m tests.faults`: run fault schedules and print a summary line."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.faults.harness import Result, run_schedule
from tests.faults.schedule import generate

DEFAULT_STEPS = 12


def run_seeds(seeds: Sequence[int], steps: int, base: Path, keep: bool = False) -> list[Result]:
    """Run the schedule of each seed under `base`; a schedule's files are removed after it
    unless it found violations or `keep` is set."""
    results = []
    for seed in seeds:
        root = Path(tempfile.mkdtemp(prefix=f"seed-{seed}-", dir=base))
        result = run_schedule(generate(seed, steps), root)
        if result.violations or keep:
            print(f"  logs of seed {seed}: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        results.append(result)
        sys.stdout.flush()
    return results


def summary(results: Sequence[Result]) -> str:
    steps = sum(r.steps for r in results)
    violations = sum(len(r.violations) for r in results)
    return f"faults schedules={len(results)} steps={steps} violations={violations}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--seed", type=int, action="append", help="run this seed (repeatable)")
    parser.add_argument("--schedules", type=int, default=1, help="run seeds first..first+N-1")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per schedule")
    parser.add_argument("--dir", type=Path, help="where to keep logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every schedule's logs")
    args = parser.parse_args(argv)
    seeds = args.seed or list(range(args.first_seed, args.first_seed + args.schedules))
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = args.dir or Path(tempfile.mkdtemp(prefix="weightsync-faults-"))
    results = run_seeds(seeds, args.steps, base, args.keep)
    if args.dir is None and not any(base.iterdir()):
        base.rmdir()
    violations = [v for r in results for v in r.violations]
    if violations:
        print("violations:")
        for violation in violations:
            print(f"  {violation}")
    print(summary(results))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
