"""Buffers' samples on disk: safetensors and JSON, never pickle, back exactly as saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from shared.data.persist import FORMAT_KEY, load_samples, save_samples


def roundtrip(tmp_path: Path, samples: list[Any]) -> list[Any]:
    save_samples(tmp_path / "s.safetensors", samples)
    assert b"pickle" not in (tmp_path / "s.safetensors").read_bytes()
    return load_samples(tmp_path / "s.safetensors")


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as file:
        return dict(file.metadata() or {})


def test_mappings_of_tensors_are_stacked_per_name(tmp_path: Path) -> None:
    samples = [
        {"obs": torch.randn(3, 2), "act": torch.tensor([i], dtype=torch.int64)} for i in range(5)
    ]
    back = roundtrip(tmp_path, samples)
    info = json.loads(metadata(tmp_path / "s.safetensors")[FORMAT_KEY])
    assert info == {"kind": "mappings", "count": 5, "names": ["obs", "act"], "ragged": False}
    assert [list(s) for s in back] == [["obs", "act"]] * 5
    for got, want in zip(back, samples, strict=True):
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_tensors_of_one_shape_are_stacked(tmp_path: Path) -> None:
    samples = [torch.arange(4, dtype=torch.bfloat16) + i for i in range(3)]
    back = roundtrip(tmp_path, samples)
    assert json.loads(metadata(tmp_path / "s.safetensors")[FORMAT_KEY])["kind"] == "tensors"
    assert all(torch.equal(a, b) for a, b in zip(back, samples, strict=True))


def header_bytes(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_samples_whose_shapes_vary_are_saved_flat_with_a_small_header(tmp_path: Path) -> None:
    # A header entry per tensor would pass safetensors' 100 MB header limit near 400,000
    # samples, and the checkpoint could not be loaded back.
    samples = [
        {
            "tokens": torch.arange(i % 7, dtype=torch.int32),
            "image": torch.full((i % 3, 2), float(i)),
            "reward": torch.tensor(float(i)),
        }
        for i in range(20_000)
    ]
    back = roundtrip(tmp_path, samples)
    path = tmp_path / "s.safetensors"
    assert json.loads(metadata(path)[FORMAT_KEY])["ragged"] is True
    assert header_bytes(path) < 2048
    assert len(back) == len(samples)
    for got, want in zip(back, samples, strict=True):
        assert list(got) == list(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert torch.equal(got[name], want[name])


def test_tensors_whose_shapes_vary_are_saved_flat(tmp_path: Path) -> None:
    samples = [torch.randn(i, 3).to(torch.bfloat16) for i in (2, 0, 5)]
    back = roundtrip(tmp_path, samples)
    assert json.loads(metadata(tmp_path / "s.safetensors")[FORMAT_KEY])["kind"] == "tensors"
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(back, samples, strict=True))


def test_flat_samples_whose_shapes_do_not_fit_their_values_are_refused(tmp_path: Path) -> None:
    import safetensors.torch

    path = tmp_path / "s.safetensors"
    save_samples(path, [torch.zeros(2), torch.zeros(3)])
    with safe_open(str(path), framework="pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
        kept = dict(file.metadata() or {})
    tensors["0.shapes"][1, 0] = 4  # names 6 elements, 5 saved
    safetensors.torch.save_file(tensors, str(path), metadata=kept)
    with pytest.raises(ValueError, match=r"corrupt.*the shapes name 6 elements, the values hold 5"):
        load_samples(path)


def test_other_samples_go_as_a_tree(tmp_path: Path) -> None:
    samples: list[Any] = [
        {"x": torch.zeros(2), "reward": 1.5, "done": False},
        torch.ones(3),
        (1, "two", None, float("inf")),
        {"x": torch.zeros(5)},
        {"x": torch.zeros(2, dtype=torch.int8)},
    ]
    back = roundtrip(tmp_path, samples)
    assert FORMAT_KEY not in metadata(tmp_path / "s.safetensors")
    assert back[0]["reward"] == 1.5 and back[0]["done"] is False
    assert torch.equal(back[0]["x"], torch.zeros(2))
    assert torch.equal(back[1], torch.ones(3))
    assert back[2] == (1, "two", None, float("inf"))
    assert torch.equal(back[3]["x"], torch.zeros(5))
    assert back[4]["x"].dtype == torch.int8


def test_no_samples(tmp_path: Path) -> None:
    assert roundtrip(tmp_path, []) == []


def test_unsavable_samples_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot save a object"):
        save_samples(tmp_path / "s.safetensors", [object()])


def test_a_file_not_written_here_is_refused(tmp_path: Path) -> None:
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="it was not written by save_tree"):
        load_samples(tmp_path / "other.safetensors")
