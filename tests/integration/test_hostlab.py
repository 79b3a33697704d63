"""The host lab (bench/hostlab.py): emulated hosts in network namespaces on shaped links.

Skipped, with the lab's own reason, where it cannot run (not root, no iproute2, namespaces
refused). Traffic goes only between the lab's own namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.hostlab import NETNS_ETC, PREFIX, HostLab, LabUnavailableError, rate_bits

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, "-m", "bench.hostlab"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def started(lab: HostLab) -> HostLab:
    try:
        lab.start()
    except LabUnavailableError as error:
        pytest.skip(f"host lab unavailable: {error}")
    return lab


@pytest.fixture
def lab() -> Iterator[HostLab]:
    with started(HostLab(["alpha", "beta"], rate="100mbit")) as built:
        yield built


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def sink(lab: HostLab, host: str, connections: int = 1) -> subprocess.Popen[str]:
    """A receiver on port 9000 of `host`, listening when this returns."""
    process = lab.run(
        host,
        [*TOOL, "sink", "9000", "--connections", str(connections)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "listening"
    return process


def send(lab: HostLab, host: str, to: str, megabytes: float, timeout: float = 10.0) -> str:
    """What the source tool says after sending `megabytes` from `host` to `to`:9000."""
    process = lab.run(
        host,
        [*TOOL, "source", to, "9000", str(megabytes), "--timeout", str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    out, _ = process.communicate(timeout=30)
    return str(out).strip()


def received(receiver: subprocess.Popen[str]) -> tuple[int, float]:
    assert receiver.stdout is not None
    word, total, seconds = receiver.stdout.readline().split()
    assert word == "received"
    return int(total), float(seconds)


def test_names_resolve_inside_and_nothing_routes_out(lab: HostLab) -> None:
    script = "import socket; print(socket.gethostbyname('alpha'), socket.gethostbyname('beta'))"
    resolved = subprocess.run(
        lab.command("beta", [sys.executable, "-c", script]),
        capture_output=True,
        text=True,
        check=True,
    )
    assert resolved.stdout.split() == [lab.address("alpha"), lab.address("beta")]
    # A route lookup only (no packet is sent): the lab knows no way off its own /24.
    outside = subprocess.run(
        ["ip", "-n", lab.host("alpha").namespace, "route", "get", "192.0.2.1"],
        capture_output=True,
        text=True,
    )
    assert outside.returncode != 0
    assert "unreachable" in outside.stderr
    # and the lab's addresses exist only inside it
    here = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True)
    assert lab.address("alpha") not in here.stdout


def test_links_are_shaped(lab: HostLab) -> None:
    receiver = sink(lab, "beta")
    assert send(lab, "alpha", "beta", 4) == "sent"
    total, seconds = received(receiver)
    assert total == 4_000_000
    # Unshaped, a veth pair moves this in milliseconds; shaped, never at twice the link rate.
    assert total / seconds < 2 * rate_bits("100mbit") / 8


def test_cut_stops_traffic_and_restore_brings_it_back(lab: HostLab) -> None:
    receiver = sink(lab, "beta", connections=2)
    # A transfer under way when the link is cut carries on once it returns.
    under_way = lab.run(
        "alpha", [*TOOL, "source", "beta", "9000", "8"], stdout=subprocess.PIPE, text=True, env=ENV
    )
    lab.cut("beta")
    assert send(lab, "alpha", "beta", 1, timeout=1.0) == "failed TimeoutError: timed out"
    lab.restore("beta")
    assert under_way.communicate(timeout=30)[0].strip() == "sent"
    assert received(receiver)[0] == 8_000_000
    assert send(lab, "alpha", "beta", 1) == "sent"
    assert received(receiver)[0] == 1_000_000


def test_teardown_leaves_nothing() -> None:
    lab = started(HostLab(["gamma"], rate="1gbit"))
    names = {lab.switch, lab.host("gamma").namespace}
    assert names <= namespaces()
    tracked = lab.run("gamma", ["sleep", "600"])
    # started inside the namespace without the lab's knowledge
    untracked = subprocess.Popen(lab.command("gamma", ["sleep", "600"]))
    lab.close()
    assert not names & namespaces()
    assert not (NETNS_ETC / lab.host("gamma").namespace).exists()
    assert tracked.poll() is not None
    assert untracked.wait(timeout=10) == -9


def test_a_dead_runs_namespaces_are_removed_at_start() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    ghost = f"{PREFIX}{gone.pid}x0-ghost"
    if os.geteuid() != 0:
        pytest.skip("host lab unavailable: the host lab needs root")
    subprocess.run(["ip", "netns", "add", ghost], capture_output=True, check=False)
    (NETNS_ETC / ghost).mkdir(parents=True, exist_ok=True)
    if ghost not in namespaces():
        pytest.skip(f"host lab unavailable: cannot create a network namespace ({ghost})")
    with started(HostLab(["delta"])):
        assert ghost not in namespaces()
        assert not (NETNS_ETC / ghost).exists()
