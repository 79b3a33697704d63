"""Services on emulated hosts (bench/hostlab.py) for the lab's integration tests: a trainer host
and replica hosts on shaped links, the services addressed by host name (`replicaN:9001`).

`open_lab()` starts the hosts, yields a `Lab` and stops every service before the namespaces go;
where the lab cannot run (not root, no iproute2) the test is skipped with the lab's own reason.
The lab's addresses exist only inside its namespaces, so what a replica holds is read through a
probe process inside the trainer host: GetModel on the replica's sync plane, by host name, with
the sync plane's TLS and token when the lab has them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.hostlab import HostLab
from bench.netns import LabUnavailableError
from devtools import launch
from tests.integration.conftest import Services

ROOT = Path(__file__).resolve().parents[2]

# GetModel on a replica's sync plane: argv is the model, then the CA file and the token ("" for
# none); one JSON line per host name read from stdin. A channel that failed is dropped, so a
# restarted replica is reached again at once.
PROBE = """
import json, sys, grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
model, ca, token = sys.argv[1:4]
metadata = (("authorization", "Bearer " + token),) if token else ()
channels = {}
for line in sys.stdin:
    host = line.strip()
    if host not in channels:
        address = host + ":9001"
        channels[host] = (
            grpc.secure_channel(address, grpc.ssl_channel_credentials(open(ca, "rb").read()))
            if ca
            else grpc.insecure_channel(address)
        )
    stub = pb_grpc.WeightSyncStub(channels[host])
    try:
        state = stub.GetModel(pb.GetModelRequest(model_name=model), timeout=2, metadata=metadata)
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


@dataclass(frozen=True)
class Setup:
    """What the lab's services run: the app and the model the probe reads, the arguments every
    replica and the trainer get, the fields `Lab.state` returns, and the PKI directory (TLS on
    the sync plane, a certificate per host named `<host>.pem`) or None for plaintext."""

    app: str
    model: str
    replica_args: Sequence[str] = ()
    trainer_args: Sequence[str] = ()
    fields: Sequence[str] = ("version", "digest")
    pki: Path | None = None
    token: str = ""


class Lab:
    """The lab's hosts, the services started in them and a probe of what they hold."""

    def __init__(self, hostlab: HostLab, services: Services, setup: Setup) -> None:
        self.hostlab = hostlab
        self.services = services
        self.setup = setup
        self.replicas: dict[str, subprocess.Popen[bytes]] = {}
        ca = str(setup.pki / "ca.pem") if setup.pki is not None else ""
        self._probe = hostlab.run(
            "trainer",
            [sys.executable, "-c", PROBE, setup.model, ca, setup.token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=services.env,
            cwd=ROOT,
        )

    def replicas_in(self, hosts: Sequence[str], *extra: str, suffix: str = "") -> None:
        """An inference service in each of `hosts`, both planes on its lab address (TLS with its
        own certificate where the lab has a PKI); returns once all of them serve. Logs as
        `<host><suffix>`."""
        started = []
        for host in hosts:
            name = host + suffix
            address = self.hostlab.address(host)
            ready = self.services.directory / f"{name}.ready.json"
            ready.unlink(missing_ok=True)
            command = launch.inference_command(
                self.setup.app,
                ready,
                *("--listen", f"{address}:8001", "--sync-listen", f"{address}:9001"),
                *("--metrics-listen", "off", "--sync-relay", "off"),
                *self.setup.replica_args,
                *extra,
            )
            process = self.services.spawn(
                self.hostlab.command(host, command), name, env=self._tls_env(host)
            )
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

    def _tls_env(self, host: str) -> dict[str, str]:
        pki = self.setup.pki
        if pki is None:
            return {}
        return {
            "INFERENCE_TLS_CERT": str(pki / f"{host}.pem"),
            "INFERENCE_TLS_KEY": str(pki / f"{host}.key"),
            "INFERENCE_TLS_PEER_CA": str(pki / "ca.pem"),
        }

    def trainer(self, hosts: Sequence[str], *extra: str) -> subprocess.Popen[bytes]:
        """The trainer in its host, pushing to `hosts` by name."""
        command = launch.trainer_command(
            self.setup.app,
            [f"{host}:9001" for host in hosts],
            *("--trainer-id", "trainer", "--metrics-listen", "off"),
            *self.setup.trainer_args,
            *extra,
        )
        return self.services.spawn(self.hostlab.command("trainer", command), "trainer")

    def state(self, host: str) -> dict[str, Any]:
        """What `host` serves (and receives), as its sync plane's GetModel says: the setup's
        fields, or `{"error": CODE}`."""
        assert self._probe.stdin is not None and self._probe.stdout is not None
        self._probe.stdin.write(host + "\n")
        self._probe.stdin.flush()
        found: dict[str, Any] = json.loads(self._probe.stdout.readline())
        if "error" in found:
            return found
        return {field: found[field] for field in self.setup.fields}

    def sync_address(self, host: str) -> str:
        """`host`'s sync plane by lab address, as the services' logs name it."""
        return f"{self.hostlab.address(host)}:9001"


@contextlib.contextmanager
def open_lab(services: Services, hosts: Sequence[str], rate: str, setup: Setup) -> Iterator[Lab]:
    """The lab's hosts on links of `rate`, skipping the test where the lab cannot run; every
    service is stopped before the namespaces go."""
    hostlab = HostLab(list(hosts), rate=rate)
    try:
        hostlab.start()
    except LabUnavailableError as error:
        pytest.skip(f"host lab unavailable: {error}")
    with hostlab:
        try:
            yield Lab(hostlab, services, setup)
        finally:
            services.stop_all()  # before the lab's namespaces go
