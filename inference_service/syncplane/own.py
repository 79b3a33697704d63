"""This replica's own sync plane address, and whether an address a push or a seed names is it.

A route that names the replica it reaches, or a seed aimed at the replica asked, would have it
push to itself: the second push would supersede its own in flight. Both are refused up front.
An address is this replica's when it has the sync plane's port on a host name or address of
this host (the very address listened on, where that is not a wildcard). Addresses are compared
by what they reach, not how they are spelled: a host name by the addresses it resolves to, an
IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) as its IPv4 address, an unspecified one (`0.0.0.0`,
which a connection takes for the loopback) as the loopback address, a port by its number
(leading zeros aside).
"""

from __future__ import annotations

import ipaddress
import re
import socket

WILDCARD = frozenset({"", "0.0.0.0", "::"})  # listen hosts that take every local address
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a host name, or an IPv4 address


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def split(address: str) -> tuple[str, int | None]:
    """`HOST:PORT` (or `[V6]:PORT`) -> (host, port); port None when there is none."""
    host, colon, port = address.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()):
        return address.strip("[]"), None
    return host.strip("[]"), int(port)


def address_problem(address: str) -> str | None:
    """Why a replica cannot be dialled at `address` (None: it can): it must be HOST:PORT, HOST
    a host name or IPv4 address, or an IPv6 address in brackets, with a port of 1 to 65535.
    gRPC reads more into a target than that, past every check that compares addresses: a
    scheme (`ipv4:127.0.0.1:P`, `dns:///...`) names the address after it, and a port past
    65535 is dialled modulo 65536 (`127.0.0.1:75536`), either of which may reach another
    replica, or this one."""
    host, port = split(address)
    if not host or port is None:
        return f"{address!r} is not HOST:PORT"
    if address.startswith("["):
        if not _is_ipv6(host) or not address.startswith(f"[{host}]:"):
            return f"{address!r} is not HOST:PORT: [{host}] is not an IPv6 address"
    elif not _HOST.fullmatch(host):
        return (
            f"{address!r} is not HOST:PORT: {host!r} is not a host name or an IPv4 address "
            "(an IPv6 address goes in brackets)"
        )
    if not 1 <= port <= 65535:
        return f"{address!r} names port {port}, outside 1 to 65535"
    return None


def _canonical(ip: str) -> str:
    """`ip` as one spelling of what dialling it reaches: an IPv4-mapped IPv6 address as its
    IPv4 address, an unspecified one (`0.0.0.0`, `::`) as the loopback address it connects to."""
    parsed = ipaddress.ip_address(ip)
    mapped = parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else None
    parsed = mapped or parsed
    if parsed.is_unspecified:
        return "127.0.0.1" if parsed.version == 4 else "::1"
    return str(parsed)


def _ips(host: str) -> set[str]:
    """Every address `host` resolves to (none when it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {_canonical(str(info[4][0]).split("%")[0]) for info in infos}


def endpoints(address: str, resolved: dict[str, set[str]] | None = None) -> set[tuple[str, int]]:
    """The (address, port) pairs a valid `HOST:PORT` reaches: its host's addresses, or, where
    the host resolves to none, its name (case aside). Two addresses that share one reach the
    same listening socket. `resolved` caches host lookups across calls."""
    host, port = split(address)
    assert port is not None, address
    cache = {} if resolved is None else resolved
    if host not in cache:
        cache[host] = _ips(host)
    return {(ip, port) for ip in cache[host] or {host.lower()}}


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
