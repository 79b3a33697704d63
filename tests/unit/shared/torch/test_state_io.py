"""Nested state saved as one safetensors file: every shape of tree comes back exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.torch.state_io import load_tree, save_tree


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


@pytest.mark.parametrize(
    "tree",
    [
        {},
        {"lr": 0.1, "betas": (0.9, 0.999), "name": "x", "flag": True, "none": None},
        {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {}}},
        {"nested": [[torch.zeros(0), torch.tensor(1)], {"k": torch.ones(2, dtype=torch.bfloat16)}]},
        {"inf": math.inf, "ninf": -math.inf, "nan": math.nan, "big": 2**62},
        [torch.arange(3), "a.b", {"a.b": 1, "a": {"b": 2}}],
    ],
)
def test_round_trip(tmp_path: Path, tree: Any) -> None:
    save_tree(tmp_path / "t.safetensors", tree)
    assert_same(load_tree(tmp_path / "t.safetensors"), tree)


def test_unsupported_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot save a object"):
        save_tree(tmp_path / "t.safetensors", {"x": object()})
    with pytest.raises(TypeError, match="dict keys must be int or str"):
        save_tree(tmp_path / "t.safetensors", {(1, 2): 3})
