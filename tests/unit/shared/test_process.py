"""How a service's process ends once its main() has returned (shared/process.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def ended(body: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", f"import threading\nfrom shared.process import end_process\n{body}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, time.monotonic() - started


def test_a_thread_left_running_at_exit_is_named_and_the_process_ends_within_the_bound() -> None:
    done, took = ended(
        "def handler_stuck_past_the_drain():\n"
        "    threading.Event().wait()\n"
        "threading.Thread(target=handler_stuck_past_the_drain).start()\n"
        "end_process(0, bound_s=1.0)\n"
    )
    assert done.returncode == 1
    assert took < 30
    assert "handler_stuck_past_the_drain" in done.stderr, done.stderr


def test_a_process_with_nothing_left_running_exits_at_once_with_its_own_status() -> None:
    done, took = ended(
        "threading.Thread(target=lambda: None).start()\nend_process(3, bound_s=20.0)\n"
    )
    assert done.returncode == 3
    assert took < 20
    assert done.stderr == ""
