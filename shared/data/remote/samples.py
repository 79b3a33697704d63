"""What a RemoteDataCollector reports (its stats), and the layout its samples must keep."""

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


Layout = dict[str, tuple[torch.dtype, torch.Size]]


def check_mapping(data: object) -> None:
    """Raise TypeError, naming what was given, unless `data` maps tensor names to values."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"a sample maps each tensor's name to its value (a dict), not a {type(data).__name__}"
        )


def layout_of(data: Mapping[str, Any]) -> Layout:
    """Each of a sample's names with its values' dtype and shape (as `collect` stores them:
    numpy keeps its dtype, Python numbers take torch's: float32, int64, bool)."""
    tensors = {name: as_tensor(value, name) for name, value in data.items()}
    return {name: (t.dtype, t.shape) for name, t in tensors.items()}


def rows_layout(data: Mapping[str, Any]) -> tuple[Layout, int]:
    """The layout of each row of `data` (each tensor's first dimension indexes the samples),
    and how many rows there are.

    Raises:
        ValueError: A tensor has no first dimension, or the tensors' row counts differ.
    """
    tensors = {name: as_tensor(value, name) for name, value in data.items()}
    counts = {name: len(t) if t.ndim else None for name, t in tensors.items()}
    if None in counts.values() or len(set(counts.values())) > 1:
        raise ValueError(
            "each tensor must hold the same number of samples along its first dimension: "
            + ", ".join(
                f"{n}: {'no dimension' if c is None else f'{c} rows'}" for n, c in counts.items()
            )
        )
    layout = {name: (t.dtype, t.shape[1:]) for name, t in tensors.items()}
    return layout, next(iter(counts.values()), None) or 0


def sample_bytes(layout: Layout) -> int:
    """The bytes one sample of `layout` takes."""
    return sum(shape.numel() * dtype.itemsize for dtype, shape in layout.values())


def describe(layout: Layout) -> str:
    return "{" + ", ".join(f"{n}: {d} {list(s)}" for n, (d, s) in layout.items()) + "}"


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """`value` (a tensor, numpy array or number, or nested sequences of numbers) as a tensor.

    Raises:
        ValueError: `value` is none of those (a string, None, an object), naming tensor `name`.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        # A read-only array (a served request's input, decoded as a view of its bytes) is
        # copied: torch takes no read-only memory, and warns where it is given some; so is one
        # with a negative stride (a reversed view), which torch cannot view.
        if not array.flags.writeable or any(stride < 0 for stride in array.strides):
            array = array.copy()
        try:
            return torch.from_numpy(array)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"tensor {name!r}: a numpy array of dtype {array.dtype} cannot be a tensor ({exc})"
            ) from None
    try:
        return torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"tensor {name!r}: a value of type {type(value).__name__} is not a tensor, numpy array "
            f"or number ({exc})"
        ) from None
