"""An agent that learns online: it acts in a shifting environment and streams what it saw.

Each step it draws points x in [-2, 2], asks the served model `online` (examples/online.py) for
its prediction over OIP, sees the environment's true y = sin(3x + phase), and collects each
(x, y) for the trainer's buffer with a RemoteDataCollector (which batches and streams them in the
background). Every `--shift-every` seconds the environment's phase moves on. Once a second it
prints the served version, its prediction error over that second, and how many samples the
trainer acknowledged (or dropped, were it away). SIGTERM or SIGINT end it as `--seconds` does:
what it collected is flushed to the trainer first.

python examples/agent.py [--inference 127.0.0.1:8001] [--trainer 127.0.0.1:8201] [--seconds 60]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import signal
import socket
import sys
import threading
import time

import grpc
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from inference_service.client import InferenceClient
from shared import RemoteDataCollector
from shared.grpc.address import checked_address


class ShiftingCurve:
    """y = sin(3x + phase); the phase moves on by `step` every `every` seconds."""

    def __init__(self, every: float, step: float = 1.5) -> None:
        self.every = every
        self.step = step
        self.started = time.monotonic()

    @property
    def shifts(self) -> int:
        return int((time.monotonic() - self.started) // self.every)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * x + self.shifts * self.step)


def every_address(address: str) -> str:
    """`address` as a gRPC target naming every IPv4 address its host resolves to now (the
    replicas behind a compose service name), tried in turn; as given if it resolves to none.
    ValueError for what cannot be an address."""
    host, _, port = checked_address(address, "the inference service's address").rpartition(":")
    try:
        found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return address
    ips = list(dict.fromkeys(str(info[4][0]) for info in found))
    return "ipv4:" + ",".join(f"{ip}:{port}" for ip in ips) if ips else address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference", default="127.0.0.1:8001", help="data plane HOST:PORT")
    parser.add_argument("--trainer", default="127.0.0.1:8201", help="experience plane HOST:PORT")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to act (inf: on)")
    parser.add_argument("--shift-every", type=float, default=20.0, help="seconds between shifts")
    parser.add_argument("--points", type=int, default=16, help="points per step")
    parser.add_argument("--steps-per-second", type=float, default=50.0)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    environment = ShiftingCurve(args.shift_every)
    token = os.environ.get("AGENT_EXPERIENCE_TOKEN")
    started = time.monotonic()
    try:  # an address that cannot be one is a usage error, not a traceback
        client = InferenceClient(every_address(args.inference))
    except ValueError as error:
        parser.error(f"--inference: {error}")
    try:
        collector = RemoteDataCollector(args.trainer, "experience", token=token)
    except ValueError as error:
        client.close()
        parser.error(f"--trainer: {error}")
    with client, collector:
        columns = ("time", "shift", "version", "rmse", "acked", "dropped")
        print("  ".join(f"{c:>7}" for c in columns))
        errors: list[float] = []
        version = 0
        next_report = started + 1.0
        while time.monotonic() - started < args.seconds and not stop.is_set():
            x = torch.rand(args.points, 1) * 4 - 2
            try:
                result = client.infer("online", {"x": x})
                version = result.version
                prediction = result.outputs["y"]
            except grpc.RpcError as error:  # not served yet, or the service restarts
                print(f"request failed: {error.code().name}: {error.details()}", flush=True)
                stop.wait(1)
                continue
            y = environment(x)
            assert isinstance(prediction, torch.Tensor)
            errors.append(torch.mean((prediction - y) ** 2).item())
            for point in range(args.points):
                collector.collect({"x": x[point], "y": y[point]})
            now = time.monotonic()
            if now >= next_report:
                stats = collector.stats
                rmse = math.sqrt(sum(errors) / len(errors))
                print(
                    f"{now - started:7.1f}  {environment.shifts:7d}  {version:7d}  {rmse:7.4f}  "
                    f"{stats.acknowledged:7d}  {stats.dropped:7d}",
                    flush=True,
                )
                errors.clear()
                next_report += 1.0
            stop.wait(1.0 / args.steps_per_second)
    final = collector.stats
    print(
        f"collected {final.collected}, acknowledged {final.acknowledged}, dropped {final.dropped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
