"""The load generators bench/serve.py drives each server with, and what they saw.

Closed loop (`drive_with`): `concurrency` clients each keep one prebuilt batch-1 FP32 raw
ModelInfer request in flight over gRPC, waiting for its answer before sending the next. h2load
(Debian's nghttp2-client) replays the request where it is installed; otherwise Python threads
with grpcio's client do, which take about a core of a small machine themselves.

Open loop (`drive_rate`): requests leave at a fixed rate whatever the answers do, from Python
asyncio with grpc.aio's client (h2load's --rate paces connections, not requests, and its
--timing-script-file fell ~25% behind its schedule here). Each latency counts from the time the
request was due, so a generator that falls behind shows it in the latencies too, and the rate
it reached is reported beside the rate asked. It runs in a process of its own (`Generator`), as
a client on another machine would, at a raised CPU priority where the bench may set one (root):
on a small host it shares the cores with the service and the trainer, and a generator late by
tens of milliseconds measures the host, not the server.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
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
    asked: float = 0.0  # open loop: requests asked for (the rate times the seconds)
    late: float = 0.0  # open loop: the most a request left after it was due, in seconds

    def add(self, other: Drive) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.failed += other.failed
        self.asked += other.asked
        self.late = max(self.late, other.late)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))

    @property
    def asked_rps(self) -> float:
        return self.asked / self.seconds


async def _open_loop(address: str, seconds: float, rate: float) -> Drive:
    payload = request_bytes()
    count = int(seconds * rate)
    latencies: list[float] = []
    failed = 0
    late = 0.0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await call(payload, timeout=30)  # connect outside the timed window
        loop = asyncio.get_running_loop()

        async def one(due: float) -> None:
            nonlocal failed
            try:
                await call(payload, timeout=10)
            except grpc.RpcError:
                failed += 1
            latencies.append(loop.time() - due)

        tasks = []
        started = loop.time()
        for i in range(count):
            due = started + i / rate
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            else:
                late = max(late, -wait)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - started
    return Drive(latencies, elapsed, failed, asked=rate * elapsed, late=late)


async def _closed_loop(address: str, seconds: float, concurrency: int) -> Drive:
    payload = request_bytes()
    latencies: list[float] = []
    failed = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await call(payload, timeout=30)
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = started + seconds

        async def client() -> None:
            nonlocal failed
            while (now := loop.time()) < end:
                try:
                    await call(payload, timeout=10)
                except grpc.RpcError:
                    failed += 1
                latencies.append(loop.time() - now)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = loop.time() - started
    return Drive(latencies, elapsed, failed)


def drive_aio(address: str, seconds: float, concurrency: int) -> Drive:
    """The closed loop from the open loop's generator (Python asyncio, grpc.aio's client, one
    connection): the capacity `drive_rate` can ask a share of, its own CPU counted."""
    return asyncio.run(_closed_loop(address, seconds, concurrency))


def drive_rate(address: str, seconds: float, rate: float) -> Drive:
    """Send the request at `rate` a second for `seconds` over one HTTP/2 connection, whatever
    the answers do (an open loop); `rps` is the rate reached, `asked_rps` the rate asked, both
    over the time until the last answer."""
    return asyncio.run(_open_loop(address, seconds, rate))


def default_nice() -> int:
    """The open loop's CPU priority by default: raised where the bench may raise it (root)."""
    return -10 if os.geteuid() == 0 else 0


def _set_priority(nice: int) -> None:
    os.setpriority(os.PRIO_PROCESS, 0, nice)  # this thread, and the threads it starts


class Generator:
    """The open loop's generator (`drive_rate`, and `drive_aio` for the capacity it takes shares
    of) in one process of its own at CPU priority `nice`, started fresh (spawn: the bench's own
    gRPC state does not cross a fork). What it saw comes back whole."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self._pool = ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_set_priority,
            initargs=(nice,),
        )

    def rate(self, address: str, seconds: float, rate: float) -> Drive:
        return self._pool.submit(drive_rate, address, seconds, rate).result()

    def closed(self, address: str, seconds: float, concurrency: int) -> Drive:
        return self._pool.submit(drive_aio, address, seconds, concurrency).result()

    def close(self) -> None:
        self._pool.shutdown()


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
                *(
                    "--threads",
                    "1",
                    "--duration",
                    f"{max(1, round(seconds * 1000))}ms",
                    "--warm-up-time",
                    "500ms",
                ),
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
