"""Device and CPU sizing for both services."""

from __future__ import annotations

import contextlib

import torch

from shared.cpus import available_cpus
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


def size_torch_threads(threads: int) -> int:
    """Give torch `threads` intra-op threads (0: one per available CPU) and one inter-op thread
    (requests already run in parallel on the server's threads); returns the number used."""
    count = threads or available_cpus()
    torch.set_num_threads(count)
    # Raises when already set, or once parallel work has run in this process: keep what is.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return count
