"""What a RemoteDataCollector holds and reports: samples as CPU tensors, and its stats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Sample = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CollectorStats:
    """Samples given to `collect`, acknowledged by the trainer, dropped (queue full while the
    trainer was away or slow, or refused by it), and still waiting or in flight; and the last
    problem, if any."""

    collected: int
    acknowledged: int
    dropped: int
    pending: int
    last_error: str | None


def copy_sample(data: Mapping[str, Any]) -> Sample:
    """A CPU copy of each of a sample's values: tensors and numpy arrays keep their dtype,
    Python numbers take torch's (float32, int64, bool)."""
    return {name: _copy(value) for name, value in data.items()}


def _copy(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_cpu:  # clone: half the cost of .to("cpu", copy=True); detach only if needed
            return value.detach().clone() if value.requires_grad else value.clone()
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value, copy=True))
    return torch.tensor(value)


Layout = dict[str, tuple[torch.dtype, torch.Size]]


def layout_of(sample: Sample) -> Layout:
    return {name: (t.dtype, t.shape) for name, t in sample.items()}


def describe(layout: Layout) -> str:
    return "{" + ", ".join(f"{n}: {d} {list(s)}" for n, (d, s) in layout.items()) + "}"
