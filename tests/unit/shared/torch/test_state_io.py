"""Nested state saved as one safetensors file, no pickle: every shape of tree comes back exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from shared.torch.state_io import STRUCTURE_KEY, load_tree, save_tree


def assert_same(a: Any, b: Any) -> None:
    """Equal values of the same types all the way down; tensors bit-exact, nan equals nan."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert [(k, type(k)) for k in a] == [(k, type(k)) for k in b]
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


TREES = {
    "empty dict": {},
    "empty list": [],
    "tensor free": {"lr": 0.1, "betas": (0.9, 0.999), "name": "x", "flag": True, "none": None},
    "int keys": {"state": {0: {"step": torch.tensor(3.0)}, 1: {}}, "0": "str key beside int 0"},
    "bools stay bools": {"t": True, "one": 1, "f": False, "zero": 0, "float": 1.0},
    "nested lists": [[[torch.arange(3)], []], ([1, 2], (3,)), [{"k": [torch.zeros(2, 2)]}]],
    "bf16": {"w": torch.randn(3, 4).to(torch.bfloat16), "h": torch.randn(2).half()},
    "0-dim": {"step": torch.tensor(7), "loss": torch.tensor(0.25), "flag": torch.tensor(True)},
    "empty tensor": {"e": torch.zeros(0, 3), "e1": torch.zeros(0)},
    "non-finite": {"inf": math.inf, "ninf": -math.inf, "nan": math.nan, "big": 2**70, "neg": -3},
    "tricky keys": [torch.arange(3), "a.b", {"a.b": 1, "a": {"b": 2}, "": 3, "t": {"t": 4}}],
    "a tensor alone": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "a scalar alone": 3.5,
}


@pytest.mark.parametrize("tree", TREES.values(), ids=TREES.keys())
def test_round_trip(tmp_path: Path, tree: Any) -> None:
    save_tree(tmp_path / "t.safetensors", tree)
    assert_same(load_tree(tmp_path / "t.safetensors"), tree)


def test_tensors_load_onto_the_device_asked(tmp_path: Path, device: torch.device) -> None:
    tree = {"a": torch.randn(2, 3, device=device), "b": [torch.tensor(1, device=device)]}
    save_tree(tmp_path / "t.safetensors", tree)
    loaded = load_tree(tmp_path / "t.safetensors", device)
    assert loaded["a"].device == loaded["b"][0].device == device
    assert_same(loaded, tree)
    assert load_tree(tmp_path / "t.safetensors")["a"].device == torch.device("cpu")


def test_views_shared_and_non_contiguous_tensors_are_saved_as_their_values(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    weight = torch.ones(2, requires_grad=True)
    tree = {"t": base.t(), "again": base, "same": base, "slice": base[1:, 2:], "grad": weight}
    save_tree(tmp_path / "t.safetensors", tree)
    loaded = load_tree(tmp_path / "t.safetensors")
    assert_same(loaded, {**tree, "grad": weight.detach()})
    assert loaded["t"].is_contiguous() and not loaded["grad"].requires_grad
    assert loaded["again"] is not loaded["same"]  # two entries, two tensors


def test_the_file_is_plain_safetensors_with_the_structure_as_json(tmp_path: Path) -> None:
    save_tree(tmp_path / "t.safetensors", {0: torch.ones(2), "x": (1, "a")})
    tensors = safetensors.torch.load_file(tmp_path / "t.safetensors")
    assert list(tensors) == ["0:root.0"]
    assert torch.equal(tensors["0:root.0"], torch.ones(2))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata[STRUCTURE_KEY]) == {
        "d": [[{"i": 0}, {"t": "0:root.0"}], ["x", {"u": [{"v": 1}, {"v": "a"}]}]]
    }


def test_an_optimizer_state_round_trips_into_load_state_dict(tmp_path: Path) -> None:
    parameter = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.01)
    parameter.sum().backward()
    optimizer.step()
    save_tree(tmp_path / "o.safetensors", optimizer.state_dict())
    restored = torch.optim.AdamW([torch.nn.Parameter(parameter.detach().clone())], lr=0.5)
    restored.load_state_dict(load_tree(tmp_path / "o.safetensors"))
    assert_same(restored.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"x": object()}, r"^cannot save a object at root\.x: a tree holds dicts, lists, tuples, "),
        ({"x": [1, {2}]}, r"^cannot save a set at root\.x\.1: "),
        ({(1, 2): 3}, r"^cannot save the dict key \(1, 2\) at root: keys must be int or str$"),
        ({"a": {True: 3}}, r"^cannot save the dict key True at root\.a: keys must be int or str$"),
        ({1.5: 3}, r"^cannot save the dict key 1\.5 at root: keys must be int or str$"),
    ],
)
def test_unsupported_values_are_refused(tmp_path: Path, tree: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        save_tree(tmp_path / "t.safetensors", tree)
    assert not (tmp_path / "t.safetensors").exists()


def test_a_file_save_tree_did_not_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.ones(1)}, path)
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(path))} holds no tree structure "
        rf"\(no '{STRUCTURE_KEY}' metadata\); it was not written by save_tree$",
    ):
        load_tree(path)
    safetensors.torch.save_file({}, path, metadata={STRUCTURE_KEY: '{"z": 1}'})
    with pytest.raises(ValueError, match=r"the tree metadata is corrupt \(unknown node kind 'z'\)"):
        load_tree(path)
