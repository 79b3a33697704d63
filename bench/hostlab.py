"""Emulated hosts on shaped links, on one machine: network namespaces, veth pairs, a bridge, tbf.

Each lab host is a network namespace of its own with loopback and one NIC, `eth0`, whose other
end is a port of a Linux bridge living in a further namespace, the lab's switch. Both
directions of every link are shaped with `tc qdisc ... tbf`: the host's `eth0` egress (what the
host sends) and its switch port's egress (what the host receives), so M copies leaving one host
share that host's rate. Addresses come from a private /24 that exists only inside the lab's
namespaces, and no namespace has a route anywhere else: no packet leaves the lab. Host names
resolve inside every lab namespace through `/etc/netns/<namespace>/hosts`, which
`ip netns exec` mounts over /etc/hosts, so services are addressed by name as in a deployment.

    with HostLab(["trainer", "replica1"], rate="1gbit") as lab:
        sink = lab.run("replica1", [sys.executable, "-m", "bench.hostlab", "sink", "9000"])
        ...
        lab.cut("replica1")      # its link goes dark (switch port down); TCP retransmits
        lab.restore("replica1")  # and carries on

Teardown always runs: leaving the `with` block, `close()`, or at interpreter exit (atexit); a
run killed outright leaves namespaces whose names carry its dead process id, and the next lab
started on the machine removes them (bench/netns.py). It needs root and iproute2 (`ip`, `tc`);
elsewhere, or where a namespace cannot be created, it raises LabUnavailableError, whose message
says why (tests skip with it).

    python -m bench.hostlab check [--rate 1gbit] [--mb 256]   # two hosts: the measured rate
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from bench.netns import (
    NETNS_ETC,
    PREFIX,
    LabError,
    LabUnavailableError,
    remove_namespace,
    remove_stale,
    run_tool,
    unavailable,
)

SUBNET = "10.213.0"  # the lab's /24; .1 is left unused, hosts get .2, .3, ...
HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
LATENCY = "25ms"  # how long tbf queues a packet before dropping it (its queue length)
_serial = itertools.count()


def rate_bits(rate: str) -> int:
    """Bits per second of a tc rate such as `100mbit` or `1gbit`."""
    found = RATE.match(rate.lower())
    if found is None:
        raise ValueError(f"rate {rate!r}: expected a number and bit, kbit, mbit or gbit")
    return int(float(found.group(1)) * RATE_UNITS[found.group(2)])


@dataclass(frozen=True)
class Host:
    """One lab host: its name (resolvable inside the lab), namespace, address and the name of
    its port on the lab's switch."""

    name: str
    namespace: str
    address: str
    port: str


class HostLab:
    """`hosts` (names) on a bridge, every link shaped to `rate` in both directions. Started by
    `start()` or entering a `with` block; torn down by `close()`, leaving it, or at exit."""

    def __init__(
        self,
        hosts: Sequence[str],
        rate: str = "1gbit",
        *,
        subnet: str = SUBNET,
        prefix: str = PREFIX,
    ) -> None:
        if not hosts or len(hosts) > 250:
            raise ValueError("a lab has 1 to 250 hosts")
        for name in hosts:
            if not HOST_NAME.match(name):
                raise ValueError(f"host name {name!r}: lower-case letters, digits and '-'")
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"host names repeat: {list(hosts)}")
        rate_bits(rate)  # validates
        self.rate = rate
        self.prefix = prefix
        tag = f"{prefix}{os.getpid()}x{next(_serial)}"
        self.switch = f"{tag}-switch"
        self.hosts: dict[str, Host] = {
            name: Host(name, f"{tag}-{name}", f"{subnet}.{i + 2}", f"p{i}")
            for i, name in enumerate(hosts)
        }
        self._processes: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._started = False
        self._closed = False

    # -- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Build the lab. LabUnavailableError when this machine cannot; LabError when a step
        fails (what was built is removed either way)."""
        if self._started:
            raise LabError("this lab was started already")
        self._started = True
        reason = unavailable()
        if reason is not None:
            raise LabUnavailableError(reason)
        remove_stale(self.prefix)
        atexit.register(self.close)
        try:
            self._add_namespace(self.switch)
            self._in(self.switch, "link", "add", "br0", "type", "bridge")
            self._in(self.switch, "link", "set", "br0", "up")
            for host in self.hosts.values():
                self._add_host(host)
            hosts_file = "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(
                f"{h.address}\t{h.name}\n" for h in self.hosts.values()
            )
            for host in self.hosts.values():
                folder = NETNS_ETC / host.namespace
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "hosts").write_text(hosts_file)
                except OSError as error:
                    raise LabUnavailableError(f"cannot write {folder}/hosts: {error}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the processes started with `run` (and close their pipes), kill anything else
        left in the lab's namespaces, delete them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        for name in reversed(self._created):
            remove_namespace(name)
        self._created.clear()

    # -- building ------------------------------------------------------------------------------

    def _add_namespace(self, name: str) -> None:
        done = run_tool(["ip", "netns", "add", name], check=False)
        if done.returncode != 0:
            raise LabUnavailableError(
                f"cannot create a network namespace ({name}): {done.stderr.strip()}"
            )
        self._created.append(name)
        # No IPv6: the lab speaks IPv4 on its /24 only (no router solicitations, no DAD).
        for scope in ("all", "default"):
            self._sysctl(name, f"net/ipv6/conf/{scope}/disable_ipv6", "1", check=False)
        self._in(name, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._add_namespace(host.namespace)
        try:
            self._in(
                host.namespace,
                *("link", "add", "eth0", "type", "veth"),
                *("peer", "name", host.port, "netns", self.switch),
            )
        except LabError as error:  # a kernel without veth
            raise LabUnavailableError(f"cannot create a veth pair: {error}") from None
        self._in(host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        self._in(host.namespace, "link", "set", "eth0", "up")
        self._in(self.switch, "link", "set", host.port, "master", "br0")
        self._in(self.switch, "link", "set", host.port, "up")
        self._shape(host, "add")

    def _shape(self, host: Host, verb: str) -> None:
        bits = rate_bits(self.rate)
        # A burst of 2 ms at the rate (at least 32 KiB, a few GSO segments): tbf refills it
        # with high-resolution timers, so this holds the rate without starving fast links.
        burst = max(bits // 8 // 500, 32 * 1024)
        spec = ["tbf", "rate", self.rate, "burst", str(burst), "latency", LATENCY]
        for namespace, device in ((host.namespace, "eth0"), (self.switch, host.port)):
            argv = ["tc", "-n", namespace, "qdisc", verb, "dev", device, "root", *spec]
            done = run_tool(argv, check=False)
            if done.returncode != 0 and "unknown" in done.stderr.lower():  # no sch_tbf
                raise LabUnavailableError(f"tc has no tbf qdisc here: {done.stderr.strip()}")
            if done.returncode != 0:
                raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")

    def _in(self, namespace: str, *args: str) -> None:
        run_tool(["ip", "-n", namespace, *args])

    def _sysctl(self, namespace: str, key: str, value: str, *, check: bool = True) -> None:
        # /proc/sys/net shows the writer's network namespace.
        script = f"echo {value} > /proc/sys/{key}"
        run_tool(["ip", "netns", "exec", namespace, "sh", "-c", script], check=check)

    # -- using ---------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no lab host {name!r}; the lab has {', '.join(self.hosts)}") from None

    def address(self, name: str) -> str:
        return self.host(name).address

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside host `name` (its network, its /etc/hosts)."""
        return ["ip", "netns", "exec", self.host(name).namespace, *argv]

    def run(self, name: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside host `name` (Popen keyword arguments pass through); the lab
        stops it at teardown if it still runs."""
        process: subprocess.Popen[Any] = subprocess.Popen(self.command(name, argv), **popen)
        self._processes.append(process)
        return process

    def cut(self, name: str) -> None:
        """Host `name`'s link goes dark: its switch port goes down, so what it sends and what
        is sent to it is dropped; connections stay open and retransmit, as over a pulled
        cable."""
        self._in(self.switch, "link", "set", self.host(name).port, "down")

    def restore(self, name: str) -> None:
        """Host `name`'s link comes back (its switch port up)."""
        self._in(self.switch, "link", "set", self.host(name).port, "up")

    def set_rate(self, rate: str) -> None:
        """Shape every link, both directions, to `rate` from now on."""
        rate_bits(rate)
        self.rate = rate
        for host in self.hosts.values():
            self._shape(host, "change")


# -- a sender and a receiver, for checking the lab by hand and in tests ---------------------------

CHUNK = 1 << 20


def sink(port: int, connections: int) -> None:
    """Accept `connections` connections on `port` in turn; for each read to EOF and print
    `received BYTES SECONDS` (from the first byte to EOF)."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("listening", flush=True)
        for _ in range(connections):
            conn, _peer = server.accept()
            with conn:
                total, started = 0, None
                while data := conn.recv(CHUNK):
                    started = started or time.perf_counter()
                    total += len(data)
                elapsed = time.perf_counter() - started if started else 0.0
                print(f"received {total} {elapsed:.6f}", flush=True)


def source(host: str, port: int, megabytes: float, timeout: float) -> None:
    """Connect to `host:port` (`timeout` seconds for the connection) and send `megabytes` MB."""
    block = b"\0" * CHUNK
    left = int(megabytes * 1e6)
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(None)
        while left > 0:
            conn.sendall(block[: min(left, CHUNK)])
            left -= CHUNK
    print("sent", flush=True)


def check(rate: str, megabytes: float) -> float:
    """Two hosts on `rate` links: megabytes per second from one to the other."""
    with HostLab(["alpha", "beta"], rate=rate) as lab:
        python = [sys.executable, "-m", "bench.hostlab"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        receiver = lab.run("beta", [*python, "sink", "9000"], stdout=subprocess.PIPE, env=env)
        assert receiver.stdout is not None
        receiver.stdout.readline()  # listening
        lab.run("alpha", [*python, "source", "beta", "9000", str(megabytes)], env=env).wait()
        _, total, seconds = receiver.stdout.readline().split()
        return int(total) / float(seconds) / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the host lab: check it, or its socket tools")
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="two hosts: the rate one sends to the other")
    checking.add_argument("--rate", default="1gbit")
    checking.add_argument("--mb", type=float, default=256.0, help="megabytes to send")
    sinking = commands.add_parser("sink", help="receive and time connections")
    sinking.add_argument("port", type=int)
    sinking.add_argument("--connections", type=int, default=1)
    sourcing = commands.add_parser("source", help="send megabytes to host:port")
    sourcing.add_argument("host")
    sourcing.add_argument("port", type=int)
    sourcing.add_argument("mb", type=float)
    sourcing.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "sink":
        sink(args.port, args.connections)
    elif args.command == "source":
        try:
            source(args.host, args.port, args.mb, args.timeout)
        except OSError as error:
            print(f"failed {type(error).__name__}: {error}", flush=True)
            return 1
    else:
        try:
            measured = check(args.rate, args.mb)
        except LabUnavailableError as error:
            print(f"hostlab unavailable: {error}")
            return 2
        print(
            f"hostlab link={args.rate} measured={measured:.1f} MB/s "
            f"link_rate={rate_bits(args.rate) / 8e6:.1f} MB/s "
            f"ratio={measured / (rate_bits(args.rate) / 8e6):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
