"""Device and CPU sizing for both services."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from shared.errors import ConfigurationError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; otherwise `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(
            f"unknown device {name!r}; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"device {name!r} was asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"device {name!r}: only cpu and cuda are supported")
    return device


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's `--cpus`), which os.cpu_count() and torch's defaults both ignore."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, math.ceil(int(quota) / int(period))))


def size_torch_threads(threads: int) -> int:
    """Give torch `threads` intra-op threads (0: one per available CPU) and one inter-op thread
    (requests already run in parallel on the server's threads); returns the number used."""
    count = threads or available_cpus()
    torch.set_num_threads(count)
    # Raises when already set, or once parallel work has run in this process: keep what is.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return count
