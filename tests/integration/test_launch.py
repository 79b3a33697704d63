"""devtools/launch.py, which the tests, the benches and the demo start processes with: a service
that fails to start is reported with the end of its log, and stopping ends what ignores SIGTERM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from devtools.launch import ROOT, Launcher, NotReadyError, kill, spawn, wait_for

IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_service_that_exits_before_it_is_ready_is_reported_with_the_end_of_its_log(
    tmp_path: Path,
) -> None:
    with Launcher(tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)}) as launcher:
        with pytest.raises(NotReadyError) as caught:
            launcher.start_inference("tests.integration.apps:no_such_app")
        (process,) = launcher.processes
    assert process.returncode == 2
    log = tmp_path / "inference.log"
    heading, *lines = str(caught.value).splitlines()
    assert heading == (
        f"inference service 'inference' exited with code 2 before it was ready; the end of {log}:"
    )
    assert lines == log.read_text().splitlines()[-len(lines) :]
    assert lines[-1].endswith(
        "ERROR inference_service: module 'tests.integration.apps' has no attribute 'no_such_app'"
    )


def test_stopping_kills_what_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path, dict(os.environ), grace=0.5)
    stubborn = launcher.spawn([sys.executable, "-c", IGNORES_SIGTERM], "stubborn")
    log = launcher.log_path("stubborn")
    assert log is not None
    wait_for(stubborn, lambda: "ignoring" in log.read_text(), what="stubborn", timeout=30)
    launcher.stop_all()
    assert stubborn.returncode == -9  # SIGKILL


def test_a_process_gets_its_own_variables_over_the_launchers(tmp_path: Path) -> None:
    with Launcher(tmp_path, {**os.environ, "SHARED": "all", "OWN": "launcher"}) as launcher:
        printer = "import os; print(os.environ['SHARED'], os.environ['OWN'])"
        ranked = launcher.spawn([sys.executable, "-c", printer], "ranked", env={"OWN": "rank0"})
        plain = launcher.spawn([sys.executable, "-c", printer], "plain")
        assert (ranked.wait(timeout=60), plain.wait(timeout=60)) == (0, 0)
    assert launcher.env["OWN"] == "launcher"  # the launcher's own environment is left alone
    assert (tmp_path / "ranked.log").read_text() == "all rank0\n"
    assert (tmp_path / "plain.log").read_text() == "all launcher\n"


def test_kill_ends_a_process_at_once_whatever_it_ignores(tmp_path: Path) -> None:
    stubborn = spawn([sys.executable, "-c", IGNORES_SIGTERM], dict(os.environ), tmp_path / "s.log")
    wait_for(stubborn, lambda: "ignoring" in (tmp_path / "s.log").read_text(), what="s", timeout=30)
    assert kill(stubborn) == -9
    assert kill(stubborn) == -9  # a process that has exited is left as it is
