"""Start the services as real processes on free loopback ports and talk to them over gRPC."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from devtools.launch import Launcher
from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc
from tests.integration.pki import make_pki

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@dataclass
class Inference:
    process: subprocess.Popen[bytes]
    data: str
    sync: str
    log: Path
    metrics_url: str
    pki: Path | None = None  # when the service runs with mutual TLS (see test_security.py)
    relay_pid: int | None = None  # its sync relay process (None with --sync-relay off)

    def sync_stub(self) -> sync_grpc.WeightSyncStub:
        if self.pki is None:
            return sync_grpc.WeightSyncStub(grpc.insecure_channel(self.sync))
        credentials = grpc.ssl_channel_credentials(
            (self.pki / "ca.pem").read_bytes(),
            (self.pki / "client.key").read_bytes(),
            (self.pki / "client.pem").read_bytes(),
        )
        return sync_grpc.WeightSyncStub(grpc.secure_channel(self.sync, credentials))

    def metrics(self) -> str:
        """What the service's metrics endpoint answers now."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())

    def metric(self, sample: str) -> float:
        """The value of one exported sample, named with its labels as the endpoint writes
        them (`name{label="value"}`); 0 where the service exports none such."""
        found = re.findall(rf"^{re.escape(sample)} (\S+)$", self.metrics(), re.M)
        return float(found[0]) if found else 0.0

    def model_state(self, name: str, token: str | None = None) -> sync_pb.ModelState:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        request = sync_pb.GetModelRequest(model_name=name)
        return self.sync_stub().GetModel(request, timeout=10, metadata=metadata)


class Services(Launcher):
    """Starts processes for one test, each logging to `<name>.log` in its temporary directory,
    and stops every one of them afterwards."""

    def inference(
        self, app: str, *extra: str, name: str = "inference", tls: Path | None = None
    ) -> Inference:
        started = self.start_inference(
            app,
            "--metrics-listen",
            "127.0.0.1:0",
            # The relay is what hosts with 4 or more CPUs run (`auto`); tests use it on
            # any machine, and pass `--sync-relay off` for the in-process sync plane.
            "--sync-relay",
            "on",
            *extra,
            name=name,
        )
        assert started.log is not None and started.metrics_url is not None
        return Inference(
            started.process,
            started.data,
            started.sync,
            started.log,
            started.metrics_url,
            tls,
            started.relay_pid,
        )

    def trainer(
        self, app: str, inference: Sequence[Inference], *extra: str, name: str = "trainer"
    ) -> subprocess.Popen[bytes]:
        targets = [i.sync for i in inference]
        return self.start_trainer(
            app, targets, "--trainer-id", name, "--metrics-listen", "127.0.0.1:0", *extra, name=name
        )

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    # Trainers read the pushes they send ahead on hosts with cores to spare
    # (shared/grpc/prefetch.py); make them take that path here too, whatever this host has.
    env.setdefault("WEIGHTSYNC_PREFETCH", "1")
    with Services(tmp_path, env) as running:
        yield running


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA with a server and a client certificate it signed (tests/integration/pki.py)."""
    return make_pki(tmp_path / "pki")


def wait_until(predicate: object, timeout: float = 60.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")
