"""The two servers the serving benches drive: this project's inference service and MLServer,
each serving the same torch MLP (bench/mlp.py) with the same weights.

MLServer runs from its own virtual environment (its dependencies differ from ours), created on
first use under .bench/mlserver-venv unless an `mlserver` executable is given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import safetensors.torch
import torch

from bench import load
from bench.mlp import MLP
from bench.swap import stop
from bench.sync import start_inference
from shared.gen.inference import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlp_env(tmp: str) -> dict[str, str]:
    """The environment both servers run in: the MLP's weights saved under `tmp`."""
    torch.manual_seed(0)
    weights = Path(tmp) / "mlp.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), weights)
    return {**os.environ, "BENCH_MLP_WEIGHTS": str(weights), "PYTHONPATH": str(ROOT)}


def mlserver_executable(given: str | None) -> str:
    if given:
        return given
    venv = ROOT / ".bench" / "mlserver-venv"
    executable = venv / "bin" / "mlserver"
    if not executable.exists():
        print("# creating MLServer's environment in .bench/mlserver-venv (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "torch==2.13.0",
                "mlserver",
                "safetensors",
                # mlserver 1.7.1's inference-pool workers die at start under uvloop >= 0.21
                # ("There is no current event loop"); its older pin keeps its default setup
                "uvloop<0.21",
            ],
            check=True,
        )
    return str(executable)


def wait_ready(address: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    ready = pb.ModelReadyRequest(name="mlp")
    channel = grpc.insecure_channel(address)
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelReady",
        request_serializer=pb.ModelReadyRequest.SerializeToString,
        response_deserializer=pb.ModelReadyResponse.FromString,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            try:
                if call(ready, timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    finally:
        channel.close()
    raise SystemExit("the server did not become ready")


@dataclass
class Ours:
    """Our inference service, ready, its answer checked."""

    process: subprocess.Popen[bytes]
    address: str
    ports: dict[str, int]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics_port']}/metrics"


@contextmanager
def ours(tmp: str, env: dict[str, str], *flags: str) -> Iterator[Ours]:
    """This project's inference service on free loopback ports, with `flags` added."""
    own = tempfile.mkdtemp(dir=tmp)  # each start its own ready file
    process, ports = start_inference(
        "bench.serve_app:app", own, env, "--metrics-listen", "127.0.0.1:0", *flags
    )
    try:
        address = f"127.0.0.1:{ports['data_port']}"
        wait_ready(address, process)
        load.check_answer(address)
        yield Ours(process, address, ports)
    finally:
        stop(process)


@contextmanager
def mlserver(tmp: str, env: dict[str, str], executable: str | None) -> Iterator[str]:
    """MLServer with its defaults serving the MLP through bench/mlserver_runtime.py; yields its
    gRPC address once its answer is checked."""
    models = Path(tmp) / "models"
    model_dir = models / "mlp"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model-settings.json").write_text(
        json.dumps({"name": "mlp", "implementation": "bench.mlserver_runtime.TorchMLP"})
    )
    grpc_port = free_port()
    (models / "settings.json").write_text(
        json.dumps(
            {
                "grpc_port": grpc_port,
                "http_port": free_port(),
                "metrics_port": free_port(),
                "debug": False,
            }
        )
    )
    log_path = Path(tmp) / "mlserver.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [mlserver_executable(executable), "start", str(models)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{grpc_port}"
    try:
        try:
            wait_ready(address, process)
            load.check_answer(address)
        except SystemExit:
            print(log_path.read_text()[-3000:], file=sys.stderr)
            raise
        yield address
    finally:
        stop(process)
