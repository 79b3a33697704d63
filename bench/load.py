"""The load generator bench/serve.py drives each server with, and what it saw.

`concurrency` clients each keep one prebuilt batch-1 FP32 raw ModelInfer request in flight over
gRPC, waiting for its answer before sending the next (a closed loop). h2load (Debian's
nghttp2-client) replays the request where it is installed; otherwise Python threads with
grpcio's client do, which take about a core of a small machine themselves.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from shared.gen.inference import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
GENERATORS = ("h2load", "threads")
DEFAULT = "h2load" if shutil.which("h2load") else "threads"


def request_bytes() -> bytes:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return bytes(request.SerializeToString())


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
    def p50(self) -> float:
        return float(np.percentile(self.latencies, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))


def drive_threads(address: str, seconds: float, concurrency: int) -> Drive:
    """Send the request from `concurrency` Python threads, each waiting for its answer."""
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


def drive_h2load(address: str, seconds: float, concurrency: int) -> Drive:
    """Replay the prebuilt request with h2load: `concurrency` connections, one request in flight
    on each. h2load sees HTTP statuses only; a gRPC error travels in the trailers of an HTTP
    200, so callers check the server's own count of failed requests too."""
    with tempfile.TemporaryDirectory() as tmp:
        body, log = Path(tmp) / "request", Path(tmp) / "requests.log"
        message = request_bytes()
        body.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)  # gRPC framing
        started = time.monotonic()
        subprocess.run(
            [
                "h2load",
                *("--clients", str(concurrency), "--max-concurrent-streams", "1"),
                *("--threads", "1", "--duration", f"{seconds:g}", "--warm-up-time", "500ms"),
                *("--header", "content-type: application/grpc", "--header", "te: trailers"),
                *("--data", str(body), "--log-file", str(log)),
                f"http://{address}{METHOD}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        elapsed = time.monotonic() - started
        rows = [line.split("\t") for line in log.read_text().splitlines()]
    # --log-file rows: start time, HTTP status (-1: the stream failed), elapsed microseconds
    failed = sum(1 for row in rows if row[1] != "200")
    return Drive([int(row[2]) / 1e6 for row in rows], min(seconds, elapsed), failed)


def drive_with(generator: str, address: str, seconds: float, concurrency: int) -> Drive:
    if generator == "h2load":
        return drive_h2load(address, seconds, concurrency)
    return drive_threads(address, seconds, concurrency)


def check_answer(address: str) -> None:
    """One request through a real gRPC client: the server must answer it with the MLP's output
    (h2load counts HTTP statuses, and a gRPC error is an HTTP 200 with an error trailer)."""
    channel = grpc.insecure_channel(address)
    call = channel.unary_unary(
        METHOD, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
    )
    response = call(request_bytes(), timeout=30)
    channel.close()
    shapes = [list(output.shape) for output in response.outputs]
    if shapes != [[1, 10]]:
        raise SystemExit(f"{address} answered outputs of shapes {shapes}, not [[1, 10]]")
