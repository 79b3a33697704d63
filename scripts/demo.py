"""Run the pair on the bundled example, on this machine, and query it while it learns.

Starts `inference-service` and `trainer-service` on free loopback ports with the quickstart app,
then runs the example client, which prints the served version and the model's error against the
true function as training proceeds. Stops both services (SIGTERM, graceful) at the end.

    python scripts/demo.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "examples.quickstart:app"


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            info: dict[str, int] = json.loads(path.read_text())
            return info
        if process.poll() is not None:
            raise SystemExit(f"the inference service exited with code {process.returncode}")
        time.sleep(0.1)
    raise SystemExit("the inference service did not become ready in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to watch it learn")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="weightsync-demo-") as tmp:
        ready = Path(tmp) / "inference.json"
        inference = subprocess.Popen(
            [
                str(bin_dir / "inference-service"),
                "--models",
                APP,
                "--listen",
                "127.0.0.1:0",
                "--sync-listen",
                "127.0.0.1:0",
                "--device",
                "cpu",
                "--ready-file",
                str(ready),
                "--log-level",
                "WARNING",
                "--metrics-listen",
                "off",
            ],
            cwd=ROOT,
            env=env,
        )
        processes = [inference]
        try:
            ports = wait_for_file(ready, inference, timeout=60)
            trainer = subprocess.Popen(
                [
                    str(bin_dir / "trainer-service"),
                    "--models",
                    APP,
                    "--inference",
                    f"127.0.0.1:{ports['sync_port']}",
                    "--device",
                    "cpu",
                    "--state-dir",
                    str(Path(tmp) / "trainer-state"),
                    "--run-interval",
                    "0.2",
                    "--log-level",
                    "WARNING",
                    "--metrics-listen",
                    "off",
                ],
                cwd=ROOT,
                env=env,
            )
            processes.append(trainer)
            print(
                f"inference-service: OIP on 127.0.0.1:{ports['data_port']}, "
                f"sync plane on 127.0.0.1:{ports['sync_port']}"
            )
            print("trainer-service: training the quickstart model, pushing after every run\n")
            client = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "examples" / "client.py"),
                    "--address",
                    f"127.0.0.1:{ports['data_port']}",
                    "--seconds",
                    str(args.seconds),
                ],
                cwd=ROOT,
                env=env,
                check=False,
            )
            return client.returncode
        finally:
            # The trainer first, and wait for it: stopped together, its last push could find
            # the inference service already gone and report a failed sync.
            for process in reversed(processes):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    sys.exit(main())
