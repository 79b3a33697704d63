"""The sync relay's heartbeat to the service's process (relay/pulse.py), and the watch that
judges by it (relay/frames.py's ServiceWatch)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from inference_service.syncplane.relay.frames import ServiceStopped, ServiceWatch
from inference_service.syncplane.relay.pulse import Pulse, PulseAnswerer
from tests.integration.conftest import wait_until


def test_an_answered_heartbeat_never_waits(tmp_path: Path) -> None:
    answerer = PulseAnswerer(str(tmp_path / "pulse.sock"))
    answerer.start()
    pulse = Pulse(str(tmp_path / "pulse.sock"))
    try:
        assert pulse.waited_s() == 0.0  # sent
        wait_until(lambda: pulse.waited_s() == 0.0, timeout=10)  # answered, and sent again
    finally:
        pulse.close()
        answerer.close()


def test_an_unanswered_heartbeat_is_waited_for_and_the_watch_gives_up(tmp_path: Path) -> None:
    # A listener that never accepts: the beats go into its backlog, as into a frozen process's.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "pulse.sock"))
    silent.listen(1)
    pulse = Pulse(str(tmp_path / "pulse.sock"))
    watch = ServiceWatch(os.getppid(), silent_s=0.2, pulse=pulse)
    try:
        assert pulse.waited_s() == 0.0
        wait_until(lambda: pulse.waited_s() >= 0.2, timeout=10)
        with pytest.raises(ServiceStopped, match=r"is stuck: it has left a heartbeat unanswered"):
            watch()
    finally:
        pulse.close()
        silent.close()


def test_a_heartbeat_socket_nobody_serves_is_a_stopped_service(tmp_path: Path) -> None:
    watch = ServiceWatch(os.getppid(), silent_s=3.0, pulse=Pulse(str(tmp_path / "none.sock")))
    with pytest.raises(ServiceStopped, match=r"has no heartbeat: cannot reach"):
        watch()
