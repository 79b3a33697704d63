"""Encoded deltas across emulated hosts (bench/hostlab.py): a trainer host and three replica
hosts on shaped links, the services addressed by host name (`replicaN:9001`).

The model trains in fp32 at a small learning rate and is served in bf16
(tests/integration/encoding_apps.py): with `--push-encoding auto` the trainer measures each
link and sends the changed tensors `sparse`, down one chain whose replicas pass the encoded
bytes on as they arrive; every replica must serve the trained weights converted, bit for bit.
A replica restarted without its state holds no base: it gets whole tensors, then deltas again.

Skipped, with the lab's own reason, where the lab cannot run (not root, no iproute2). The test
reads what the replicas hold through a probe inside the trainer host (the lab's addresses exist
only inside the lab).
"""

from __future__ import annotations

import functools
import json
import re
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
from tests.integration.test_encodings import committed, trained_bf16

APP = "tests.integration.encoding_apps:served_bf16"
RATE = "20mbit"  # a link the encoders outrun many times over: `auto` must encode
REPLICAS = ["replica1", "replica2", "replica3"]

# GetModel on a replica's sync plane, by host name: one JSON line per host name read from
# stdin. A channel that failed is dropped, so a restarted replica is reached again at once.
PROBE = """
import json, sys, grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
channels = {}
for line in sys.stdin:
    host = line.strip()
    if host not in channels:
        channels[host] = grpc.insecure_channel(host + ":9001")
    stub = pb_grpc.WeightSyncStub(channels[host])
    try:
        state = stub.GetModel(pb.GetModelRequest(model_name="wide"), timeout=2)
        out = {"version": state.version, "digest": state.digest.hex()}
    except grpc.RpcError as error:
        channels.pop(host).close()
        out = {"error": error.code().name}
    print(json.dumps(out), flush=True)
"""


class Lab:
    """The lab's hosts, the services started in them and a probe of what they hold."""

    def __init__(self, hostlab: HostLab, services: Services) -> None:
        self.hostlab = hostlab
        self.services = services
        self.replicas: dict[str, subprocess.Popen[bytes]] = {}
        self._probe = hostlab.run(
            "trainer",
            [sys.executable, "-c", PROBE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=services.env,
            cwd=Path(__file__).resolve().parents[2],
        )

    def start_replicas(self, hosts: list[str], name: str | None = None) -> None:
        """An inference service in each of `hosts`, both planes on its lab address; returns
        once all of them serve."""
        started = []
        for host in hosts:
            label = name or host
            address = self.hostlab.address(host)
            ready = self.services.directory / f"{label}.ready.json"
            ready.unlink(missing_ok=True)
            command = launch.inference_command(
                APP,
                ready,
                *("--listen", f"{address}:8001", "--sync-listen", f"{address}:9001"),
                *("--metrics-listen", "off", "--sync-relay", "off", "--allow-open-sync"),
                *("--log-level", "DEBUG"),
            )
            process = self.services.spawn(self.hostlab.command(host, command), label)
            started.append((host, label, ready, process))
        for host, label, ready, process in started:
            launch.wait_for(
                process,
                functools.partial(launch.read_json, ready),
                what=f"inference service in {host}",
                timeout=60,
                log=self.services.log_path(label),
            )
            self.replicas[host] = process

    def trainer(self, *extra: str) -> subprocess.Popen[bytes]:
        """The trainer in its host, pushing to every replica by name."""
        command = launch.trainer_command(
            APP,
            [f"{host}:9001" for host in REPLICAS],
            *("--trainer-id", "trainer", "--metrics-listen", "off", "--log-level", "DEBUG"),
            *extra,
        )
        return self.services.spawn(self.hostlab.command("trainer", command), "trainer")

    def state(self, host: str) -> dict[str, Any]:
        """What `host` serves, as its sync plane's GetModel says."""
        assert self._probe.stdin is not None and self._probe.stdout is not None
        self._probe.stdin.write(host + "\n")
        self._probe.stdin.flush()
        found: dict[str, Any] = json.loads(self._probe.stdout.readline())
        return found


@pytest.fixture
def lab(services: Services) -> Iterator[Lab]:
    hostlab = HostLab(["trainer", *REPLICAS], rate=RATE)
    try:
        hostlab.start()
    except LabUnavailableError as error:
        pytest.skip(f"host lab unavailable: {error}")
    with hostlab:
        try:
            yield Lab(hostlab, services)
        finally:
            services.stop_all()  # before the lab's namespaces go


def travelled(log: str, address: str) -> list[tuple[str, str]]:
    """Each push the trainer committed on `address`: its kind and how its tensors travelled."""
    return re.findall(rf"\((full|delta on \d+)\) committed on {address}: .*tensors: (.*)", log)


def test_sparse_deltas_chosen_by_auto_are_forwarded_encoded_and_a_restarted_replica_gets_whole(
    lab: Lab, tmp_path: Path
) -> None:
    lab.start_replicas(REPLICAS)
    state_dir = tmp_path / "trainer"
    trainer = lab.trainer(
        # Runs enough to outlast a replica's restart on two busy cores.
        *("--max-runs", "30", "--run-interval", "0.3", "--state-dir", str(state_dir))
    )
    wait_until(lambda: lab.state("replica3").get("version", 0) >= 4, timeout=60)

    # The last replica restarts in its host without its state: no base to decode against.
    lab.replicas["replica3"].terminate()
    assert lab.replicas["replica3"].wait(timeout=30) == 0
    lab.start_replicas(["replica3"], name="replica3-again")
    third = f"{lab.hostlab.address('replica3')}:9001"
    wait_until(  # the first version went to it directly, in full; its catch-up does too
        lambda: [k for k, _ in travelled(lab.services.log("trainer"), third)].count("full") >= 2,
        timeout=60,
    )
    assert trainer.wait(timeout=90) == 0, lab.services.log("trainer")

    log = lab.services.log("trainer")
    # On the shaped link `auto` measured the link, then sent the changed tensors sparse, once
    # per version, to the head of the chain; the others were fed through it.
    head = travelled(log, f"{lab.hostlab.address('replica1')}:9001")
    assert head[0] == ("full", "whole=4"), head
    assert all(kind.startswith("delta on") for kind, _ in head[1:]), head
    assert all(re.search(r"(sparse|xor-\w+)=", tensors) for _, tensors in head[1:]), head
    assert any("sparse=" in tensors for _, tensors in head[1:]), head
    assert "passing the push on to " in lab.services.log("replica1")
    assert "passing the push on to " in lab.services.log("replica2")
    assert len(committed(lab.services.log("replica2"))) == len(head)
    # The restarted replica got a full push of whole tensors, then deltas again.
    again = committed(lab.services.log("replica3-again"))
    assert again[0] == "full" and again[-1].startswith("delta on"), again
    expected = state_digest(trained_bf16(state_dir)).hex()
    for host in REPLICAS:
        assert lab.state(host) == {"version": 31, "digest": expected}, host
