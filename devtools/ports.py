"""Loopback ports for a service that must be told its port before it starts.

Binding port 0 and closing the socket hands out a port from the kernel's ephemeral range, the
same range it picks the source port of every outgoing connection from: between the close and
the service's own bind, any connection a test or a service opens may take it ("Address already
in use"). `free_ports` hands out ports below that range instead, which the kernel never picks on
its own, checks each is bindable now, and never hands out the same port twice in one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")

_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nothing holds now and the kernel will not hand out as
    source ports (on a host whose ephemeral range leaves no room below it, ports from it)."""
    top = _ephemeral_start()
    ports: list[int] = []
    for _ in range(count * 1000):
        if len(ports) == count:
            return ports
        if top - LOWEST < 1000:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
        else:
            port = random.randrange(LOWEST, top)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            ports.append(port)
    if len(ports) == count:
        return ports
    raise OSError(f"no {count} free loopback ports below {top}")


def free_port() -> int:
    """One port as `free_ports` hands them out."""
    return free_ports(1)[0]
