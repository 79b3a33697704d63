"""A bounded soak: concurrent inference while a sync commits every 100 ms.

Starts the inference service and a trainer (separate processes, loopback) on a stamp model whose
output reveals a mixed-version response, drives it with client threads for `--seconds`, and
prints

    soak errors=N rss_growth=X

N counts failed requests and responses that mixed two versions; X is the growth of the inference
process's resident memory from the second fifth of the run (after warm-up) to the last fifth,
each the median of samples taken every half second: a single sample swings by the size of the
model as pushes come and go, which a leak does not.

    python -m bench.soak [--seconds 120] [--mb 16] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from bench.sync import rss_kib
from devtools import launch
from inference_service.client import InferenceClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description="bounded soak: inference while syncs commit")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--mb", type=int, default=16, help="model size in MiB")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    args = parser.parse_args()
    env = {**os.environ, "BENCH_MB": str(args.mb), "PYTHONPATH": str(ROOT)}
    with (
        tempfile.TemporaryDirectory() as tmp,
        launch.Launcher(Path(tmp), env, logs=False, grace=60) as launcher,
    ):
        inference = launcher.start_inference("bench.soak_app:app", *launch.QUIET, timeout=300)
        trainer = launcher.start_trainer(
            "bench.soak_app:app", [inference.sync], "--run-interval", "0.1", *launch.QUIET
        )
        errors: list[str] = []
        answered = 0
        versions: set[int] = set()
        stop = threading.Event()
        lock = threading.Lock()

        def client() -> None:
            nonlocal answered
            x = torch.zeros(1, 8)
            with InferenceClient(inference.data) as c:
                while not stop.is_set():
                    try:
                        result = c.infer("stamp", {"x": x})
                        means = result.outputs["means"]
                        ok = bool(torch.all(means == means[0, 0]))
                    except grpc.RpcError as error:
                        ok, result = False, None
                        with lock:
                            errors.append(f"{error.code().name}: {error.details()}")
                    with lock:
                        answered += 1
                        if result is not None:
                            versions.add(result.version)
                            if not ok:
                                errors.append(f"version {result.version} mixed: {means}")

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        try:
            for thread in threads:
                thread.start()
            started = time.monotonic()
            samples: list[tuple[float, int]] = []
            while (elapsed := time.monotonic() - started) < args.seconds:
                samples.append((elapsed / args.seconds, rss_kib(inference.process.pid, "VmRSS")))
                time.sleep(0.5)
            warm = statistics.median(kib for at, kib in samples if 0.2 <= at < 0.4)
            end = statistics.median(kib for at, kib in samples if at >= 0.8)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            launch.stop(trainer, 60)  # first: its last push then finds the service up
    print(
        f"# {answered} requests over {args.seconds:g}s, {len(versions)} versions served, "
        f"{args.mb} MiB model, RSS {warm / 1024:.0f} -> {end / 1024:.0f} MiB"
    )
    for error in errors[:5]:
        print(f"# error: {error}")
    print(f"soak errors={len(errors)} rss_growth={(end - warm) / warm:.2%}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
