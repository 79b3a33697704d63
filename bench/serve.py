"""Serving figures against MLServer, as ratios measured in the same run.

Serves one torch MLP (64 -> 256 -> 10) from this project's inference service and from MLServer
(its custom-runtime way of serving torch), one after the other on this machine, and drives each
with the same load generator: `--concurrency` client threads sending one prebuilt batch-1 FP32
raw ModelInfer request over gRPC for `--seconds`. Prints

    serve_mlp ratio_vs_mlserver=X p99_ratio=Y    throughput ours/theirs; p99 ours/theirs
    swap_p99_ratio=Z failed=N                    our p99 while a 100 MB model's sync commits
                                                 every second, over our p99 without syncs
                                                 (the trainer in its own process, at nice 19;
                                                 5 s slices with and without, alternating)

MLServer runs from its own virtual environment (its dependencies differ from ours), created on
first use under .bench/mlserver-venv unless --mlserver points at an `mlserver` executable.
`--device cuda` serves ours from the GPU; `--only-ours` skips MLServer (and the ratios against
it), for hosts where its environment cannot be installed.

    python -m bench.serve [--seconds 20] [--concurrency 8] [--device cpu] [--only-ours]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.mlp import MLP
from bench.sync import start_inference
from shared.gen.inference import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"
SEGMENT_S = 5.0  # the with- and without-syncs slices alternate this often


def request_bytes() -> bytes:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return request.SerializeToString()


@dataclass
class Drive:
    """What a load generator saw: every request's latency, the time it ran, the failures."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failed: int = 0

    def add(self, other: Drive) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.failed += other.failed

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))


def drive(address: str, seconds: float, concurrency: int) -> Drive:
    """Send the request from `concurrency` threads, each waiting for its answer, for `seconds`."""
    payload = request_bytes()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    failures = [0] * concurrency
    deadline = time.monotonic() + seconds

    def worker(index: int) -> None:
        channel = grpc.insecure_channel(address)
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        call(payload, timeout=30)  # connect outside the timed window
        while (now := time.monotonic()) < deadline:
            try:
                call(payload, timeout=10)
            except grpc.RpcError:
                failures[index] += 1
            latencies[index].append(time.monotonic() - now)
        channel.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Drive([x for per in latencies for x in per], time.monotonic() - started, sum(failures))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited before it was ready")
        try:
            if call(ready, timeout=2).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description="serving figures against MLServer")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--mlserver", help="path of an `mlserver` executable to use")
    parser.add_argument("--device", default="cpu", help="our service's device (cpu, cuda)")
    parser.add_argument("--only-ours", action="store_true", help="skip MLServer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = Path(tmp) / "mlp.safetensors"
        safetensors.torch.save_file(MLP().state_dict(), weights)
        env = {**os.environ, "BENCH_MLP_WEIGHTS": str(weights), "PYTHONPATH": str(ROOT)}

        # ours
        server, ports = start_inference(
            "bench.serve_app:app",
            tmp,
            env,
            *("--device", args.device, "--metrics-listen", "127.0.0.1:0"),
        )
        data = f"127.0.0.1:{ports['data_port']}"
        try:
            wait_ready(data, server)
            drive(data, 2, args.concurrency)  # warm
            ours = drive(data, args.seconds, args.concurrency)
            quiet, syncing, pushes = swapping(
                data, f"127.0.0.1:{ports['sync_port']}", args.seconds, args.concurrency, env
            )
            swaps = swap_pauses(f"http://127.0.0.1:{ports['metrics_port']}/metrics")
        finally:
            stop(server)
        print(
            f"# ours on {args.device}, concurrency {args.concurrency}, {args.seconds:g}s: "
            f"{ours.rps:,.0f} req/s p99 {ours.p99 * 1e3:.2f} ms ({ours.failed} failed)"
        )
        print(
            f"# {SEGMENT_S:g}s slices with and without syncs, alternating, {args.seconds:g}s of "
            f"each: without {quiet.rps:,.0f} req/s p99 {quiet.p99 * 1e3:.2f} ms; with "
            f"{syncing.rps:,.0f} req/s p99 {syncing.p99 * 1e3:.2f} ms, {pushes} commits of the "
            f"100 MB model (trainer in its own process); {swaps}"
        )
        print(
            f"swap_p99_ratio={syncing.p99 / quiet.p99:.2f} failed={syncing.failed + quiet.failed}"
        )
        if args.only_ours:
            return 0

        # MLServer
        model_dir = Path(tmp) / "models" / "mlp"
        model_dir.mkdir(parents=True)
        (model_dir / "model-settings.json").write_text(
            json.dumps({"name": "mlp", "implementation": "bench.mlserver_runtime.TorchMLP"})
        )
        grpc_port = free_port()
        (Path(tmp) / "models" / "settings.json").write_text(
            json.dumps(
                {
                    "grpc_port": grpc_port,
                    "http_port": free_port(),
                    "metrics_port": free_port(),
                    "debug": False,
                }
            )
        )
        log = (Path(tmp) / "mlserver.log").open("wb")
        theirs = subprocess.Popen(
            [mlserver_executable(args.mlserver), "start", str(Path(tmp) / "models")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        address = f"127.0.0.1:{grpc_port}"
        try:
            try:
                wait_ready(address, theirs)
            except SystemExit:
                print((Path(tmp) / "mlserver.log").read_text()[-3000:], file=sys.stderr)
                raise
            drive(address, 2, args.concurrency)
            theirs_seen = drive(address, args.seconds, args.concurrency)
        finally:
            stop(theirs)

    print(
        f"# MLServer, concurrency {args.concurrency}, {args.seconds:g}s: "
        f"{theirs_seen.rps:,.0f} req/s p99 {theirs_seen.p99 * 1e3:.2f} ms "
        f"({theirs_seen.failed} failed)"
    )
    print(
        f"serve_mlp ratio_vs_mlserver={ours.rps / theirs_seen.rps:.2f} "
        f"p99_ratio={ours.p99 / theirs_seen.p99:.2f}"
    )
    return 0


def swapping(
    data: str, sync: str, seconds: float, concurrency: int, env: dict[str, str]
) -> tuple[Drive, Drive, int]:
    """Drive the MLP with and without a trainer process syncing the 100 MB model each second.

    The two conditions alternate in `SEGMENT_S` slices (the trainer is stopped with SIGSTOP for
    the slices without syncs), so drift on a noisy machine hits both alike; each condition
    gets `seconds` in all. Returns (without syncs, with syncs, commits)."""
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer_service",
            "--models",
            "bench.serve_app:app",
            "--device",
            "cpu",
            "--inference",
            sync,
            "--run-interval",
            "1",
            "--log-level",
            "INFO",
            "--metrics-listen",
            "off",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # In a deployment the trainer has a host of its own; here it shares these cores with
        # the server and the load generator, so it runs at the lowest CPU priority to stand in
        # for that. The inference service's own cost of receiving the syncs is fully counted.
        preexec_fn=lambda: os.nice(19),
    )
    quiet, syncing = Drive(), Drive()
    try:
        time.sleep(3)  # let it start and push its first full copy
        slices = max(1, round(seconds / SEGMENT_S))
        for _ in range(slices):
            trainer.send_signal(signal.SIGSTOP)
            quiet.add(drive(data, seconds / slices, concurrency))
            trainer.send_signal(signal.SIGCONT)
            syncing.add(drive(data, seconds / slices, concurrency))
    finally:
        trainer.send_signal(signal.SIGCONT)
        stop(trainer)  # type: ignore[arg-type]
    log = trainer.stderr.read() if trainer.stderr else ""
    return quiet, syncing, log.count("committed on 1 inference service")


def swap_pauses(metrics_url: str) -> str:
    """What the swaps cost the request path: how long each commit held the requests' lock."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "weightsync_inference_swap_duration_seconds"
        for sample in family.samples
        if sample.labels.get("model") == "blob"
    }
    prefix = "weightsync_inference_swap_duration_seconds"
    count = samples.get((f"{prefix}_count", None), 0.0)
    if not count:
        return "no swaps counted"
    total = samples[(f"{prefix}_sum", None)]
    under = samples.get((f"{prefix}_bucket", "0.001"), 0.0)
    return (
        f"the swap held the requests' lock {total / count * 1e6:.1f} us on average over "
        f"{count:.0f} swaps, {under:.0f} of them under 1 ms"
    )


if __name__ == "__main__":
    sys.exit(main())
