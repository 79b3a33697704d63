"""Device selection for both services."""

from __future__ import annotations

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
