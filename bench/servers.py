"""The servers the serving benches drive: this project's inference service and MLServer, each
serving the same torch MLP (bench/mlp.py) with the same weights, and the ceiling yardstick, a
bare grpc.aio server answering a canned response (bench/echo_server.py).

MLServer runs from its own virtual environment (its dependencies differ from ours), created on
first use under .bench/mlserver-venv unless an `mlserver` executable is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import safetensors.torch
import torch

from bench import load
from bench.mlp import MLP
from devtools import launch
from devtools.ports import free_port
from inference_service.client import InferenceClient

ROOT = launch.ROOT


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


def mlp_ready(address: str) -> bool:
    """Whether the server at `address` says the MLP is ready (False while it cannot answer)."""
    with InferenceClient(address, timeout_s=2) as client:
        try:
            return client.model_ready("mlp")
        except grpc.RpcError:
            return False


def wait_ready(
    address: str, process: subprocess.Popen[bytes], what: str, log: Path | None = None
) -> None:
    launch.wait_for(
        process, lambda: mlp_ready(address), what=what, timeout=120, log=log, interval=0.5
    )


@dataclass(frozen=True)
class Served:
    """A server that answers the MLP: its address, and its process (whose tree's CPU time
    `load.cpu_seconds` reads)."""

    address: str
    pid: int

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process `pid` and its live descendants have used so far:
    a server's own cost, apart from its load generator's (MLServer's defaults answer from worker
    processes of its own). 0.0 where /proc is absent."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, seen = [pid], {pid}
    for member in tree:
        for child, parent in parents.items():
            if parent == member and child not in seen:
                seen.add(child)
                tree.append(child)
    return sum(used.get(member, 0.0) for member in tree)


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
    own = Path(tempfile.mkdtemp(dir=tmp))  # each start its own ready file
    with launch.Launcher(own, env, logs=False, grace=60) as launcher:
        service = launcher.start_inference(
            "bench.serve_app:app",
            *launch.QUIET,
            "--metrics-listen",
            "127.0.0.1:0",
            *flags,
            timeout=300,
        )
        wait_ready(service.data, service.process, "our inference service")
        load.check_answer(service.data)
        yield Ours(service.process, service.data, service.ready)


@contextmanager
def echo(tmp: str, env: dict[str, str]) -> Iterator[Served]:
    """The bare grpc.aio server of bench/echo_server.py, once it answers."""
    own = Path(tempfile.mkdtemp(dir=tmp))
    port_file = own / "port"
    with launch.Launcher(own, env, grace=10) as launcher:
        process = launcher.spawn(
            [sys.executable, "-m", "bench.echo_server", str(port_file)], "echo"
        )
        launch.wait_for(
            process,
            lambda: port_file.exists() and port_file.read_text(),
            what="the echo server",
            timeout=60,
            log=launcher.log_path("echo"),
        )
        address = f"127.0.0.1:{port_file.read_text()}"
        load.check_answer(address)
        yield Served(address, process.pid)


@contextmanager
def mlserver(
    tmp: str, env: dict[str, str], executable: str | None, parallel_workers: int | None = None
) -> Iterator[Served]:
    """MLServer serving the MLP through bench/mlserver_runtime.py, with its defaults or with
    `parallel_workers` set (0: the model runs in MLServer's own process, no worker pool), once
    its answer (on its gRPC address) is checked."""
    models = Path(tempfile.mkdtemp(dir=tmp)) / "models"
    model_dir = models / "mlp"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model-settings.json").write_text(
        json.dumps({"name": "mlp", "implementation": "bench.mlserver_runtime.TorchMLP"})
    )
    grpc_port = free_port()
    settings: dict[str, object] = {
        "grpc_port": grpc_port,
        "http_port": free_port(),
        "metrics_port": free_port(),
        "debug": False,
    }
    if parallel_workers is not None:
        settings["parallel_workers"] = parallel_workers
    (models / "settings.json").write_text(json.dumps(settings))
    with launch.Launcher(models.parent, env, grace=60) as launcher:
        process = launcher.spawn(
            [mlserver_executable(executable), "start", str(models)], "mlserver"
        )
        log = launcher.log_path("mlserver")
        address = f"127.0.0.1:{grpc_port}"
        wait_ready(address, process, "MLServer", log)
        try:
            load.check_answer(address)
        except SystemExit:
            print(launch.tail(log), file=sys.stderr)
            raise
        yield Served(address, process.pid)
