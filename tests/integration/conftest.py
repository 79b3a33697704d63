"""Start the services as real processes on free loopback ports and talk to them over gRPC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc

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

    def model_state(self, name: str, token: str | None = None) -> sync_pb.ModelState:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        request = sync_pb.GetModelRequest(model_name=name)
        return self.sync_stub().GetModel(request, timeout=10, metadata=metadata)


class Services:
    """Starts processes for one test and stops every one of them afterwards."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def inference(
        self, app: str, *extra: str, name: str = "inference", tls: Path | None = None
    ) -> Inference:
        ready = self.tmp / f"{name}.ready.json"
        log = self.tmp / f"{name}.log"
        process = self._spawn(
            [
                "-m",
                "inference_service",
                "--models",
                app,
                "--listen",
                "127.0.0.1:0",
                "--sync-listen",
                "127.0.0.1:0",
                "--device",
                "cpu",
                "--ready-file",
                str(ready),
                "--metrics-listen",
                "127.0.0.1:0",
                # The relay is what hosts with 4 or more CPUs run (`auto`); tests use it on
                # any machine, and pass `--sync-relay off` for the in-process sync plane.
                "--sync-relay",
                "on",
                *extra,
            ],
            log,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(f"inference service exited:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"inference service not ready:\n{log.read_text()}")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        return Inference(
            process,
            f"127.0.0.1:{ports['data_port']}",
            f"127.0.0.1:{ports['sync_port']}",
            log,
            f"http://127.0.0.1:{ports['metrics_port']}/metrics",
            tls,
            ports.get("sync_relay_pid"),
        )

    def trainer(
        self, app: str, inference: Sequence[Inference], *extra: str, name: str = "trainer"
    ) -> subprocess.Popen[bytes]:
        return self._spawn(
            [
                "-m",
                "trainer_service",
                "--models",
                app,
                "--device",
                "cpu",
                "--inference",
                ",".join(i.sync for i in inference),
                "--trainer-id",
                name,
                "--metrics-listen",
                "127.0.0.1:0",
                *extra,
            ],
            self.tmp / f"{name}.log",
        )

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    # Pushes read ahead on hosts with cores to spare (shared/grpc/prefetch.py); make the
    # services take that path here too, whatever this host has.
    env.setdefault("WEIGHTSYNC_PREFETCH", "1")
    running = Services(tmp_path, env)
    try:
        yield running
    finally:
        running.stop_all()


def wait_until(predicate: object, timeout: float = 60.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")
