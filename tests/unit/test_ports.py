"""The loopback ports tests and benches hand to a service before it starts."""

from __future__ import annotations

import socket

import pytest

from devtools import ports


def test_ports_are_distinct_bindable_and_never_ones_the_kernel_picks_for_a_connection() -> None:
    start = ports._ephemeral_start()
    handed = ports.free_ports(50) + [ports.free_port() for _ in range(10)]
    assert len(set(handed)) == len(handed)
    for port in handed:
        assert ports.LOWEST <= port < start
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_a_port_something_holds_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        held = int(holder.getsockname()[1])
        picks = iter([held, held, *range(held + 1, held + 100)])
        monkeypatch.setattr(ports.random, "randrange", lambda low, high: next(picks))
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: held + 2000)
        monkeypatch.setattr(ports, "LOWEST", held - 1)
        (port,) = ports.free_ports(1)
    assert port > held
