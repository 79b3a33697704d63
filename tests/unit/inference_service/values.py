"""Tensor values the codec tests send: each datatype's extremes, and bitwise comparison."""

from __future__ import annotations

import torch

from shared.dtypes import dtype_of


def extremes(datatype: str) -> torch.Tensor:
    """One row holding the datatype's extreme and special values."""
    dtype = dtype_of(datatype)
    if dtype == torch.bool:
        return torch.tensor([[True, False, True]])
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        values = [info.min, info.max, -0.0, float("inf"), float("nan"), 1.5]
        return torch.tensor([values], dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.tensor([[info.min, info.max, 0, 1]], dtype=dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return (
        a.contiguous().view(torch.uint8).numpy().tobytes()
        == b.contiguous().view(torch.uint8).numpy().tobytes()
    )
