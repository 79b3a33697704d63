"""This replica's own sync plane address, and whether an address a push or a seed names is it.

A route that names the replica it reaches, or a seed aimed at the replica asked, would have it
push to itself: the second push would supersede its own in flight. Both are refused up front.
An address is this replica's when it has the sync plane's port on a host name or address of
this host (the very address listened on, where that is not a wildcard).
"""

from __future__ import annotations

import ipaddress
import socket

WILDCARD = frozenset({"", "0.0.0.0", "::"})  # listen hosts that take every local address


def split(address: str) -> tuple[str, int | None]:
    """`HOST:PORT` (or `[V6]:PORT`) -> (host, port); port None when there is none."""
    host, colon, port = address.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()):
        return address.strip("[]"), None
    return host.strip("[]"), int(port)


def address_problem(address: str) -> str | None:
    """Why a replica cannot be dialled at `address` (None: it can): it must be HOST:PORT with a
    port of 1 to 65535. gRPC dials a larger port modulo 65536, so an address such as
    `127.0.0.1:75536` would reach another replica (or this one) past every check that compares
    addresses."""
    host, port = split(address)
    if not host or port is None:
        return f"{address!r} is not HOST:PORT"
    if not 1 <= port <= 65535:
        return f"{address!r} names port {port}, outside 1 to 65535"
    return None


def _ips(host: str) -> set[str]:
    """Every address `host` resolves to (none when it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {str(info[4][0]).split("%")[0] for info in infos}


def _local(ip: str) -> bool:
    """Whether `ip` is an address of this host (one a socket here can bind)."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def is_own(address: str, listen: str, port: int) -> bool:
    """Whether `address` reaches this sync plane: its port, on a host name or address that is
    this host's (the very address listened on, where that is not a wildcard)."""
    host, hop_port = split(address)
    if hop_port != port:
        return False
    ips = _ips(host)
    listen_host, _ = split(listen)
    if listen_host not in WILDCARD:
        return bool(ips & _ips(listen_host))
    return any(_local(ip) for ip in ips)


class OwnAddress:
    """Where this sync plane is reached, once it listens (`serving_at`); until then no address
    is its own."""

    def __init__(self) -> None:
        self._listen = ""
        self._port: int | None = None

    def serving_at(self, listen: str, port: int) -> None:
        """The sync plane's listen address and bound port."""
        self._listen, self._port = listen, port

    def names(self, address: str) -> bool:
        """Whether `address` reaches this sync plane."""
        return self._port is not None and is_own(address, self._listen, self._port)
