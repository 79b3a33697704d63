"""Chain forwarding across emulated hosts (bench/hostlab.py): a trainer host and replica hosts,
each a network namespace of its own on a shaped link, the services addressed by host name
(`replicaN:9001`) with TLS and a token on the sync plane, every certificate naming its host.

Skipped, with the lab's own reason, where the lab cannot run (not root, no iproute2). The
links run at 50 Mbit/s and the model is 8 MiB, so a push lasts about a second per hop: long
enough to kill or cut a replica while its bytes flow in. The test reads what the replicas hold
through a probe inside the trainer host (the lab's addresses exist only inside the lab).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.hostlab import HostLab
from bench.netns import LabUnavailableError
from devtools import launch
from shared.weights.digest import state_digest
from tests.integration.conftest import Services, wait_until
from tests.integration.pki import make_ca, make_cert
from tests.integration.test_forwarding import stamp_state

STAMP = "tests.integration.apps:stamp"
TOKEN = "lab-sync-secret"
RATE = "50mbit"
STAMP_MB = 8
REPLICAS = ["replica1", "replica2", "replica3"]

# GetModel on a replica's sync plane, by host name, with TLS and the token: one JSON line per
# host name read from stdin. A channel that failed is dropped, so a restarted replica is
# reached again at once.
PROBE = """
import json, sys, grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
ca = open(sys.argv[1], "rb").read()
metadata = (("authorization", "Bearer " + sys.argv[2]),)
channels = {}
for line in sys.stdin:
    host = line.strip()
    if host not in channels:
        credentials = grpc.ssl_channel_credentials(ca)
        channels[host] = grpc.secure_channel(host + ":9001", credentials)
    stub = pb_grpc.WeightSyncStub(channels[host])
    try:
        state = stub.GetModel(
            pb.GetModelRequest(model_name="stamp"), timeout=2, metadata=metadata
        )
        out = {
            "version": state.version,
            "digest": state.digest.hex(),
            "pending_version": state.pending.version,
            "pending_bytes": state.pending.bytes_received,
        }
    except grpc.RpcError as error:
        channels.pop(host).close()
        out = {"error": error.code().name}
    print(json.dumps(out), flush=True)
"""


class Lab:
    """The lab's hosts, the services started in them and a probe of what they hold."""

    def __init__(self, hostlab: HostLab, services: Services, pki: Path) -> None:
        self.hostlab = hostlab
        self.services = services
        self.pki = pki
        self.replicas: dict[str, subprocess.Popen[bytes]] = {}
        self._probe = hostlab.run(
            "trainer",
            [sys.executable, "-c", PROBE, str(pki / "ca.pem"), TOKEN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=services.env,
            cwd=Path(__file__).resolve().parents[2],
        )

    def replicas_in(self, hosts: list[str], *extra: str, suffix: str = "") -> None:
        """An inference service in each of `hosts`, both planes on its lab address, TLS with
        its own certificate; returns once all of them serve. Logs as `<host><suffix>`."""
        started = []
        for host in hosts:
            name = host + suffix
            address = self.hostlab.address(host)
            ready = self.services.directory / f"{name}.ready.json"
            ready.unlink(missing_ok=True)
            command = launch.inference_command(
                STAMP,
                ready,
                *("--listen", f"{address}:8001", "--sync-listen", f"{address}:9001"),
                *("--metrics-listen", "off", "--sync-relay", "off"),
                *extra,
            )
            env = {
                "INFERENCE_TLS_CERT": str(self.pki / f"{host}.pem"),
                "INFERENCE_TLS_KEY": str(self.pki / f"{host}.key"),
                "INFERENCE_TLS_PEER_CA": str(self.pki / "ca.pem"),
            }
            process = self.services.spawn(self.hostlab.command(host, command), name, env=env)
            started.append((host, name, ready, process))
        for host, name, ready, process in started:
            launch.wait_for(
                process,
                functools.partial(launch.read_json, ready),
                what=f"inference service in {host}",
                timeout=60,
                log=self.services.log_path(name),
            )
            self.replicas[host] = process

    def trainer(self, hosts: list[str], *extra: str) -> subprocess.Popen[bytes]:
        """The trainer in its host, pushing to `hosts` by name."""
        command = launch.trainer_command(
            STAMP,
            [f"{host}:9001" for host in hosts],
            *("--trainer-id", "trainer", "--metrics-listen", "off"),
            *extra,
        )
        return self.services.spawn(self.hostlab.command("trainer", command), "trainer")

    def state(self, host: str) -> dict[str, Any]:
        """What `host` serves and receives, as its sync plane's GetModel says."""
        assert self._probe.stdin is not None and self._probe.stdout is not None
        self._probe.stdin.write(host + "\n")
        self._probe.stdin.flush()
        found: dict[str, Any] = json.loads(self._probe.stdout.readline())
        return found

    def holds(self, host: str, version: int, run: int) -> bool:
        """`host` serves `version`, bit-exact the stamp model after trainer run `run`."""
        state = self.state(host)
        expected = state_digest(stamp_state(run, mb=STAMP_MB)).hex()
        return state.get("version") == version and state.get("digest") == expected

    def receiving(self, host: str, version: int) -> bool:
        state = self.state(host)
        return state.get("pending_version") == version and state.get("pending_bytes", 0) > 0


@pytest.fixture
def lab(services: Services, tmp_path: Path) -> Iterator[Lab]:
    services.env["TEST_STAMP_MB"] = str(STAMP_MB)
    services.env.update(INFERENCE_SYNC_TOKEN=TOKEN, TRAINER_SYNC_TOKEN=TOKEN)
    hosts = ["trainer", *REPLICAS, "replica4"]
    pki = tmp_path / "pki"
    ca = make_ca(pki, "ca")
    for host in hosts[1:]:
        make_cert(pki, host, ca, f"DNS:{host}")
    services.env["TRAINER_TLS_CA"] = str(ca)
    hostlab = HostLab(hosts, rate=RATE)
    try:
        hostlab.start()
    except LabUnavailableError as error:
        pytest.skip(f"host lab unavailable: {error}")
    with hostlab:
        try:
            yield Lab(hostlab, services, pki)
        finally:
            services.stop_all()  # before the lab's namespaces go


def forwarded_to(services: Services, name: str) -> list[str]:
    """The hops the replica `name` passed pushes on to, as its log says."""
    marker = "passing the push on to "
    return [
        line.split(marker, 1)[1].split(" ", 1)[0]
        for line in services.log(name).splitlines()
        if marker in line and "more hop(s) after it" in line
    ]


def sync_address(lab: Lab, host: str) -> str:
    return f"{lab.hostlab.address(host)}:9001"


def test_three_replicas_on_shaped_links_fed_through_one_chain_by_name_with_tls(lab: Lab) -> None:
    lab.replicas_in(REPLICAS)
    trainer = lab.trainer(REPLICAS, "--max-runs", "2")
    assert trainer.wait(timeout=60) == 0, lab.services.log("trainer")
    for host in REPLICAS:
        assert lab.holds(host, 3, 2), (host, lab.state(host))
    # Versions 2 and 3 went down one chain: the trainer sent each once, to replica1.
    second, third = (sync_address(lab, host) for host in REPLICAS[1:])
    assert forwarded_to(lab.services, "replica1") == [second] * 2
    assert forwarded_to(lab.services, "replica2") == [third] * 2
    assert forwarded_to(lab.services, "replica3") == []
    assert "version 3 committed on 3 inference service(s)" in lab.services.log("trainer")


def test_a_middle_replica_killed_mid_push_is_routed_around_and_caught_up_after_restart(
    lab: Lab,
) -> None:
    lab.replicas_in(REPLICAS)
    # One run after the first sync, then a long wait: only the catch-up can feed replica2.
    trainer = lab.trainer(
        REPLICAS, "--max-runs", "2", "--run-interval", "600", "--connect-timeout", "1"
    )
    wait_until(lambda: lab.receiving("replica2", 2), timeout=60)
    lab.replicas["replica2"].kill()
    lab.replicas["replica2"].wait(timeout=10)
    wait_until(lambda: "version 2 committed on 2" in lab.services.log("trainer"), timeout=30)
    for host in ("replica1", "replica3"):
        assert lab.holds(host, 2, 1), (host, lab.state(host))
    assert forwarded_to(lab.services, "replica1") == [sync_address(lab, "replica2")]
    assert f"lagging: {sync_address(lab, 'replica2')}" in lab.services.log("trainer")

    lab.replicas_in(["replica2"], suffix="-back")
    wait_until(lambda: lab.holds("replica2", 2, 1), timeout=30)
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this


def test_a_link_cut_mid_push_is_routed_around_and_the_cut_one_caught_up_once_restored(
    lab: Lab,
) -> None:
    # A hop that takes nothing for 3 s is cut off; a push the trainer sends gets 15 s whole.
    lab.replicas_in(REPLICAS, "--push-idle-timeout-s", "3")
    trainer = lab.trainer(
        REPLICAS,
        *("--max-runs", "2", "--run-interval", "600"),
        *("--connect-timeout", "1", "--push-timeout", "15"),
    )
    wait_until(lambda: lab.receiving("replica2", 2), timeout=60)
    lab.hostlab.cut("replica2")
    wait_until(lambda: "version 2 committed on 2" in lab.services.log("trainer"), timeout=30)
    for host in ("replica1", "replica3"):
        assert lab.holds(host, 2, 1), (host, lab.state(host))
    # replica1 cut its stalled hop off within its bound and answered: the trainer never had
    # to give its push to replica1 up and try it again.
    log = lab.services.log("trainer")
    gave_up = f"{sync_address(lab, 'replica1')}: DEADLINE_EXCEEDED: Deadline Exceeded"
    assert gave_up not in log, log
    stalled = f"passing the push on to {sync_address(lab, 'replica2')} failed: DEADLINE_EXCEEDED"
    assert stalled in lab.services.log("replica1")
    assert f"lagging: {sync_address(lab, 'replica2')}" in log
    assert "error" in lab.state("replica2")  # its link is down

    lab.hostlab.restore("replica2")
    wait_until(lambda: lab.holds("replica2", 2, 1), timeout=30)
    wait_until(
        lambda: f"{sync_address(lab, 'replica2')} caught up" in lab.services.log("trainer"),
        timeout=10,
    )
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this


def test_a_replica_added_while_training_is_caught_up(lab: Lab) -> None:
    lab.replicas_in(REPLICAS)
    hosts = [*REPLICAS, "replica4"]  # replica4's host is up, its service not yet
    trainer = lab.trainer(
        hosts, "--max-runs", "2", "--run-interval", "600", "--connect-timeout", "1"
    )
    wait_until(lambda: "version 2 committed on 3" in lab.services.log("trainer"), timeout=60)
    for host in REPLICAS:
        assert lab.holds(host, 2, 1), (host, lab.state(host))

    lab.replicas_in(["replica4"])
    wait_until(lambda: lab.holds("replica4", 2, 1), timeout=30)
    assert trainer.poll() is None  # training goes on: the catch-up brought it up
