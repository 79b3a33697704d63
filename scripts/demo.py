"""Run the online-learning loop on this machine: an agent, the inference service, a trainer.

Starts the inference service and the trainer service on free loopback ports with the online
example (examples/online.py), then the agent (examples/agent.py): it asks the served model for
predictions over OIP, acts in an environment whose rule shifts every `--shift-every` seconds,
and streams what it saw to the trainer's experience plane. The trainer trains only once enough
new samples arrived and pushes each run's weights. The agent prints, once a second, the served
version and its prediction error: falling, jumping at each shift, falling again. Stops every
process (SIGTERM, graceful) at the end.

    python scripts/demo.py [--seconds 39] [--shift-every 13]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for devtools/

from devtools import launch

APP = "examples.online:app"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=39.0, help="how long the agent acts")
    parser.add_argument(
        "--shift-every", type=float, default=13.0, help="seconds between environment shifts"
    )
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="weightsync-demo-") as tmp:
        launcher = launch.Launcher(Path(tmp), env, logs=False)
        try:
            inference = launcher.start_inference(APP, *launch.QUIET)
            experience = launcher.start_experience_trainer(
                APP,
                [inference.sync],
                "--state-dir",
                str(Path(tmp) / "trainer-state"),
                *launch.QUIET,
            )
            print(f"inference-service: OIP on {inference.data}, sync plane on {inference.sync}")
            print(f"trainer-service: experience plane on {experience}; trains on 128 new samples")
            print(
                f"agent: acts for {args.seconds:g}s, the environment shifts every "
                f"{args.shift_every:g}s\n"
            )
            agent = subprocess.run(
                [
                    sys.executable,
                    str(launch.ROOT / "examples" / "agent.py"),
                    "--inference",
                    inference.data,
                    "--trainer",
                    experience,
                    "--seconds",
                    str(args.seconds),
                    "--shift-every",
                    str(args.shift_every),
                ],
                cwd=launch.ROOT,
                env=env,
                check=False,
            )
            return agent.returncode
        except launch.NotReadyError as exc:
            raise SystemExit(str(exc)) from None
        finally:
            # The trainer first, and wait for it: stopped together, its last push could find
            # the inference service already gone and report a failed sync.
            for process in reversed(launcher.processes):
                launch.stop(process, 30)


if __name__ == "__main__":
    sys.exit(main())
