"""A trainer's targets as operators configure them: a target it could never dial is refused at
start; a DNS name whose replicas move to other addresses is followed, and the addresses it no
longer names are forgotten, metrics included. The operator's tools refuse an address without a
port rather than dial one nobody gave."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from devtools.launch import trainer_command
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from tests.integration.conftest import Services, wait_until
from tests.integration.test_forwarding import free_ports
from tests.integration.test_targets import STAMP, stamp_digest, target_gauge, trainer_metrics
from tests.integration.test_tools import ADMIN, tool

HOSTS = Path("/etc/hosts")
NAME = "replicas.weightsync-review.test"


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


@pytest.fixture
def hosts() -> Iterator[Callable[..., None]]:
    """Point NAME at the addresses given in /etc/hosts (none: it does not resolve); the file is
    restored afterwards. The original lines are never rewritten (only what follows them), so
    other processes resolving names meanwhile always find them."""
    original = HOSTS.read_bytes()

    def write(content: bytes) -> None:
        with HOSTS.open("r+b") as file:
            file.write(content)
            file.truncate(len(content))

    def point(*addresses: str) -> None:
        write(original + "".join(f"{a} {NAME}\n" for a in addresses).encode())

    try:
        yield point
    finally:
        write(original)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("http://127.0.0.1:8101", "no scheme (http://, dns:///) or path"),
        ("dns:///inference:8101", "no scheme (http://, dns:///) or path"),
        ("127.0.0.1:0", "the port of an inference target is 1 to 65535"),
        ("::1:8101", "write an IPv6 address in brackets, as [::1]:8101"),
    ],
)
def test_a_target_that_can_never_be_dialled_is_refused_at_start(
    services: Services, target: str, why: str
) -> None:
    """Before: accepted, then every sync failed ("cannot resolve", or a deadline at port 0),
    retried for ever."""
    trainer = services.trainer(
        STAMP, [], "--inference", f"127.0.0.1:8101,{target}", "--max-runs", "1"
    )
    try:
        assert trainer.wait(timeout=30) == 2, services.log("trainer")
    except subprocess.TimeoutExpired:
        trainer.kill()
        trainer.wait()
        raise AssertionError(services.log("trainer")) from None
    log = services.log("trainer")
    assert f"--inference / TRAINER_INFERENCE: {target!r}: " in log, log
    assert why in log, log
    assert "Traceback" not in log, log


def test_a_replica_the_name_no_longer_resolves_to_is_forgotten_metrics_included(
    services: Services, hosts: Callable[..., None]
) -> None:
    """The name moves from one replica's address to another's: the new one is found on a later
    sync and fed bit-exact; the old address, no longer named, leaves the trainer's target
    gauges (before: its version gauge stayed, stale, for ever, as if it lagged)."""
    (port,) = free_ports(1)
    old_address, new_address = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    hosts("127.0.0.2")
    old = services.inference(STAMP, "--sync-listen", old_address, name="old")
    services.inference(STAMP, "--sync-listen", new_address, name="new")
    trainer = services.trainer(
        STAMP, [old], "--inference", f"{NAME}:{port}", "--run-interval", "0.3"
    )
    wait_until(lambda: served(old_address).version >= 2, timeout=60)
    assert target_gauge(trainer_metrics(services, "trainer"), "version", old_address)

    hosts("127.0.0.3")
    wait_until(lambda: served(new_address).version >= 2, timeout=60)
    state = served(new_address)
    assert state.digest in made(state.version)
    # The sync that found the new address no longer counted the old one.
    text = trainer_metrics(services, "trainer")
    assert target_gauge(text, "version", old_address) is None, text
    assert target_gauge(text, "lagging", old_address) is None, text
    assert f'link_bytes_per_second{{target="{old_address}"}}' not in text, text
    assert f'target_version{{model="stamp",target="{new_address}"}}' in text, text
    log = services.log("trainer")
    assert f"model stamp: {old_address} is no longer named by {NAME}:{port}" in log, log
    assert "Traceback" not in log, log
    # The replica left out keeps what it served, untouched, and the trainer's connection to it
    # is closed (before: its channel stayed open, kept alive by keepalives, for good).
    kept = served(old_address)
    assert kept.digest in made(kept.version)
    wait_until(lambda: not connected(trainer.pid, old_address), timeout=30)


def test_the_admin_tool_and_the_health_check_refuse_an_address_without_a_port(
    services: Services,
) -> None:
    """Before: gRPC dialled port 443 (exit 1, "UNAVAILABLE ... 127.0.0.1:443"), a port the
    operator never gave, where another service may answer."""
    inference = services.inference(STAMP)
    host = inference.sync.rsplit(":", 1)[0]
    for address in (host, "[::1]"):
        done = tool(services, ADMIN, "--sync", address, "models")
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"weightsync-admin: {address!r} names no port: give HOST:PORT\n"
        done = tool(services, sys.executable, "-m", "shared.healthcheck", address)
        assert done.returncode == 1, done.stderr
        assert done.stderr == f"healthcheck: {address!r} names no port: give HOST:PORT\n"
    # With its port, both reach the service.
    listed = tool(services, ADMIN, "--sync", inference.sync, "models")
    assert listed.returncode == 0 and listed.stdout.startswith("stamp\tversion 0\t"), listed
    health = tool(services, sys.executable, "-m", "shared.healthcheck", inference.data)
    assert health.returncode == 0, health.stderr


def own_name_service() -> bool:
    """Whether this host lets a process see hosts and resolv.conf files of its own (root, and
    mount namespaces)."""
    found = shutil.which("unshare")
    return found is not None and subprocess.run([found, "-m", "true"]).returncode == 0


@pytest.mark.skipif(not own_name_service(), reason="needs root and mount namespaces")
def test_a_dns_server_that_stops_answering_holds_no_sync_and_the_replica_is_still_fed(
    services: Services, tmp_path: Path
) -> None:
    """The trainer runs with its own /etc/hosts and /etc/resolv.conf: the name resolves from
    the hosts file, then is taken out of it, so each look-up waits on a DNS server that never
    answers (minutes, with the resolver's timeouts). Before: every sync blocked in that
    look-up, and the replica was fed nothing more."""
    live = services.inference(STAMP)
    port = live.sync.rsplit(":", 1)[1]
    hosts_file, resolv_file = tmp_path / "hosts", tmp_path / "resolv.conf"
    hosts_file.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")
    # TEST-NET-1 (RFC 5737): nothing answers there.
    resolv_file.write_text("nameserver 192.0.2.53\noptions timeout:30 attempts:3\n")
    command = trainer_command(
        STAMP,
        [f"{NAME}:{port}"],
        *("--trainer-id", "trainer", "--metrics-listen", "127.0.0.1:0"),
        *("--run-interval", "0.3", "--connect-timeout", "1"),
    )
    own_files = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2'
    wrap = ["unshare", "-m", "sh", "-c", f'{own_files} && exec "$@"', "sh"]
    trainer = services.spawn([*wrap, str(hosts_file), str(resolv_file), *command], "trainer")
    wait_until(lambda: live.model_state("stamp").version >= 2, timeout=60)

    with hosts_file.open("r+") as file:  # in place: the bind mount shows this very file
        file.write("127.0.0.1 localhost\n")
        file.truncate()
    before = live.model_state("stamp").version
    wait_until(lambda: live.model_state("stamp").version >= before + 3, timeout=60)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0, services.log("trainer")
    log = services.log("trainer")
    stalled = f"inference target {NAME}:{port}: its DNS look-up takes over 1.0s"
    assert f"{stalled}; feeding the addresses it last resolved to (127.0.0.1)" in log, log
    assert "Traceback" not in log, log
    last = live.model_state("stamp")
    runs = int(re.findall(r"trainer stamp: run (\d+)", log)[-1])
    assert last.digest in {stamp_digest(run) for run in range(last.version - 1, runs + 1)}


def made(version: int) -> set[bytes]:
    """Digests of the versions a stamp trainer made up to `version` (run v - 1 as a rule; an
    earlier one where a sync failed under load and its number went unused)."""
    return {stamp_digest(run) for run in range(version)}


def connected(pid: int, address: str) -> bool:
    """Whether process `pid` holds a TCP connection to `address` (HOST:PORT), as `ss` sees."""
    listed = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dst", address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return f"pid={pid}," in listed


def served(address: str) -> pb.ModelState:
    """What the inference service at `address` serves of the stamp model."""
    with grpc.insecure_channel(address) as channel:
        request = pb.GetModelRequest(model_name="stamp")
        state: pb.ModelState = pb_grpc.WeightSyncStub(channel).GetModel(request, timeout=10)
        return state
