"""The devices a test runs on: the CPU always, and CUDA where there is a GPU (skipped if not)."""

from __future__ import annotations

import pytest
import torch

NEEDS_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def devices(cuda: str = "cuda") -> list[object]:
    """Parameters for `pytest.mark.parametrize`: "cpu", and `cuda` marked as needing a GPU."""
    return ["cpu", pytest.param(cuda, marks=NEEDS_CUDA)]
