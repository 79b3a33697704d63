"""Addresses users give to dial a service: checked before gRPC sees them.

gRPC takes a port beyond 65535 modulo 65536 and an address without a port as port 443, so a
typo reaches another port, perhaps another service answering for the one meant. Every address a
user names (a trainer's targets, the Python client's, an agent's collector's) is checked here.
"""

from __future__ import annotations

import ipaddress
import re

_HOST_NAME = re.compile(r"[\w.-]+")
# gRPC name-resolver schemes a client may be given as they are (`ipv4:a:1,b:1` balances calls
# over several addresses): the user writes gRPC's own syntax there.
GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def checked_address(target: str, what: str) -> str:
    """`target` if a gRPC service can be dialled there as the user means it: `HOST:PORT` or
    `[V6]:PORT`, with no scheme or path and a port from 1 to 65535; else ValueError saying
    which part is wrong, calling the address `what` ("an inference target")."""
    host, sep, port = target.rpartition(":")
    if "/" in target or "@" in target:
        raise ValueError(
            f"{target!r}: {what} is HOST:PORT, with no scheme (http://, dns:///) or path"
        )
    if not sep or not host:
        raise ValueError(f"{target!r}: {what} is HOST:PORT; the port is missing")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{target!r}: the port of {what} is 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{target!r}: {host} is not an IPv6 address") from None
    elif host.lower().startswith(GRPC_SCHEMES):
        raise ValueError(f"{target!r}: {what} is HOST:PORT, with no scheme ({host.split(':')[0]}:)")
    elif ":" in host:
        raise ValueError(f"{target!r}: write an IPv6 address in brackets, as [{host}]:{port}")
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{target!r}: {host!r} is not a host name or address")
    return target
