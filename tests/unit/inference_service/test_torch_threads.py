"""The threads that run models use the intra-op thread count the service chose.

OpenMP's and MKL's thread counts are per thread: a matrix product in a thread torch did not set
up ran on OpenMP's default team (every CPU in the affinity mask), whatever `--torch-threads` or a
container quota said. Each case runs in a fresh process, so that no earlier torch work there has
set the thread up, and counts the process's OS threads: a team shows as threads beyond the one
that runs the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

PRELUDE = """
import asyncio, os, torch
from inference_service.dataplane.batcher import BatchingConfig
from inference_service.dataplane.service import DataPlane
from inference_service.served_model import ServedModel
from shared.app import ModelSpec, TensorSpec
from shared.devices import size_torch_threads

size_torch_threads(1)
spec = ModelSpec(
    "m", lambda: None, (TensorSpec("x", "FP32", (-1, 64)),), (TensorSpec("y", "FP32", (-1, 256)),)
)
model = ServedModel(spec, torch.nn.Linear(64, 256), lambda m, x: m(x), True, torch.device("cpu"))
before = len(os.listdir("/proc/self/task"))
"""

RUN = """
plane.set_ready(True)
async def requests():
    for _ in range(5):
        (y,), _ = await plane.infer(model, [torch.ones(5, 64)])
        assert y.shape == (5, 256)
asyncio.run(requests())
print(len(os.listdir("/proc/self/task")) - before)
plane.close()
"""

OPENMP_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # would hide the default team

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="OpenMP's default team is one thread here"
)


def new_threads(setup: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + setup + RUN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in OPENMP_SETTINGS},
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@needs_two_cpus
def test_the_batcher_runs_its_model_on_the_thread_count_chosen() -> None:
    # one thread more: the batcher's own
    assert new_threads("plane = DataPlane({'m': model}, BatchingConfig(), workers=1)\n") == 1


@needs_two_cpus
def test_unbatched_models_run_on_the_thread_count_chosen() -> None:
    # one thread more: the worker the request ran on (asyncio's loop adds none of its own)
    assert new_threads("plane = DataPlane({'m': model}, None, workers=1)\n") == 1
