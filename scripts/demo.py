"""Run the pair on the bundled example, on this machine, and query it while it learns.

Starts the inference service and the trainer service on free loopback ports with the quickstart
app, then runs the example client, which prints the served version and the model's error against
the true function as training proceeds. Stops both services (SIGTERM, graceful) at the end.

    python scripts/demo.py [--seconds 30]
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

APP = "examples.quickstart:app"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to watch it learn")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="weightsync-demo-") as tmp:
        launcher = launch.Launcher(Path(tmp), env, logs=False)
        try:
            inference = launcher.start_inference(APP, *launch.QUIET)
            launcher.start_trainer(
                APP,
                [inference.sync],
                "--state-dir",
                str(Path(tmp) / "trainer-state"),
                "--run-interval",
                "0.2",
                *launch.QUIET,
            )
            print(f"inference-service: OIP on {inference.data}, sync plane on {inference.sync}")
            print("trainer-service: training the quickstart model, pushing after every run\n")
            client = subprocess.run(
                [
                    sys.executable,
                    str(launch.ROOT / "examples" / "client.py"),
                    "--address",
                    inference.data,
                    "--seconds",
                    str(args.seconds),
                ],
                cwd=launch.ROOT,
                env=env,
                check=False,
            )
            return client.returncode
        except launch.NotReadyError as exc:
            raise SystemExit(str(exc)) from None
        finally:
            # The trainer first, and wait for it: stopped together, its last push could find
            # the inference service already gone and report a failed sync.
            for process in reversed(launcher.processes):
                launch.stop(process, 30)


if __name__ == "__main__":
    sys.exit(main())
