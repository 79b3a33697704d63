"""The inference targets a user names: checked, and resolved to the addresses to dial.

A target the user names (`HOST:PORT`) stands for every address HOST resolves to (a DNS name
behind which compose or Kubernetes puts several replicas); each address is dialled on its own,
and over TLS verified against the name the user wrote, so a certificate for `inference` or
`localhost` need not list IP addresses. A target given as an IP address is verified as given.
Look-ups run in threads of their own (`Lookups`), so that a DNS server that does not answer
holds no sync back.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from shared.grpc.address import checked_address
from shared.grpc.auth import TlsFiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One address to dial, and the host name TLS verifies there (None: the address itself)."""

    address: str
    server_name: str | None


def split(target: str) -> tuple[str, str]:
    """`HOST:PORT` (or `[V6]:PORT`) -> (host, port)."""
    host, _, port = target.rpartition(":")
    return host.strip("[]"), port


def checked(target: str) -> str:
    """`target` if an inference service can be dialled there (shared/grpc/address.py); else
    ValueError saying which part is wrong."""
    return checked_address(target, "an inference target")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addresses(host: str, port: str) -> list[str]:
    infos: list[tuple[object, ...]] = []
    for family in (socket.AF_INET, socket.AF_INET6):  # IPv4 first: "localhost" is one host
        try:
            infos = list(socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM))
        except (OSError, ValueError):
            continue
        if infos:
            break
    return [str(info[4][0]) for info in infos]  # type: ignore[index]


class _Lookup:
    """One look-up of a target's addresses, in a thread of its own (a DNS server that does not
    answer holds it for the resolver's timeouts, tens of seconds)."""

    def __init__(self, target: str) -> None:
        self.done = threading.Event()
        self.addresses: list[str] = []
        self._target = target
        threading.Thread(target=self._run, name=f"resolve {target}", daemon=True).start()

    def _run(self) -> None:
        try:
            self.addresses = _addresses(*split(self._target))
        finally:
            self.done.set()


class Lookups:
    """The targets' addresses, looked up together and waited for at most `wait_s` (None: as
    long as they take). A look-up that takes longer goes on in the background, one per target
    at a time, and the addresses the target last resolved to stand in for it meanwhile: a DNS
    server that stops answering holds no sync back, and the replicas it named are still fed."""

    def __init__(self, wait_s: float | None) -> None:
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._running: dict[str, _Lookup] = {}
        self._last: dict[str, list[str]] = {}

    def addresses(self, targets: Sequence[str]) -> dict[str, list[str]]:
        lookups: dict[str, _Lookup] = {}
        with self._lock:
            for target in dict.fromkeys(targets):
                if target not in self._running:  # else the one under way is waited for
                    self._running[target] = _Lookup(target)
                lookups[target] = self._running[target]
        deadline = None if self._wait_s is None else time.monotonic() + self._wait_s
        found: dict[str, list[str]] = {}
        for target, lookup in lookups.items():
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if lookup.done.wait(left):
                with self._lock:
                    if self._running.get(target) is lookup:
                        del self._running[target]
                    found[target] = self._last[target] = lookup.addresses
                continue
            found[target] = self._last.get(target, [])
            logger.warning(
                "inference target %s: its DNS look-up takes over %.1fs; %s",
                target,
                self._wait_s,
                f"feeding the addresses it last resolved to ({', '.join(found[target])})"
                if found[target]
                else "nothing is known of it yet",
            )
        return found


def resolve(
    targets: Sequence[str],
    unresolved: list[str] | None = None,
    lookups: Lookups | None = None,
) -> list[Endpoint]:
    """Every address of every target, each once; a DNS name stands for all the hosts behind
    it. The targets that resolve to nothing are added to `unresolved`, if given."""
    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    found = (lookups or Lookups(None)).addresses(targets)
    for target in targets:
        host, port = split(target)
        ips = found[target]
        if not ips:
            logger.warning("cannot resolve inference target %s", target)
            if unresolved is not None:
                unresolved.append(target)
        server_name = None if _is_ip(host) else host
        for ip in ips:
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if address not in seen:
                seen.add(address)
                endpoints.append(Endpoint(address, server_name))
    return endpoints


def is_loopback(target: str) -> bool:
    """Whether every address `target` resolves to is a loopback one (False if none)."""
    host, port = split(target)
    ips = [host] if _is_ip(host) else _addresses(host, port)
    return bool(ips) and all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in ips)


def warn_plaintext_token(targets: Sequence[str], token: str | None, tls: TlsFiles | None) -> None:
    """Log, once per target, that a bearer token is about to cross the network unencrypted."""
    if not token or (tls is not None and tls.enabled):
        return
    for target in targets:
        if not is_loopback(target):
            logger.warning(
                "the sync token goes to %s in plaintext: anyone who can see that traffic can "
                "read it and push weights. Give --tls-ca (TRAINER_TLS_CA) to send it over TLS",
                target,
            )
