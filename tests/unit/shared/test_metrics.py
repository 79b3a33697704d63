"""The metrics endpoint is open to anyone who reaches its port: connections are bounded in
number, and each in time however it trickles."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from shared import metrics


def scrape(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def test_connections_that_trickle_a_byte_at_a_time_are_ended_at_their_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every slot taken by a client sending one byte of its request a second (never idle for
    the idle timeout): scrapes are refused until the connections' deadline ends them."""
    monkeypatch.setattr(metrics, "CONNECTION_DEADLINE_S", 1.5)
    port = metrics.serve_metrics("127.0.0.1:0")
    stop = threading.Event()
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_CONNECTIONS)]

    def trickle() -> None:
        while not stop.wait(0.5):
            for connection in held:
                with contextlib.suppress(OSError):  # ended by the server
                    connection.send(b"G")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.5)
        assert not scrape(port)  # every slot held
        deadline = time.monotonic() + 10
        while not scrape(port):
            assert time.monotonic() < deadline, "trickling connections held every slot for 10 s"
            time.sleep(0.2)
    finally:
        stop.set()
        trickler.join()
        for connection in held:
            connection.close()
