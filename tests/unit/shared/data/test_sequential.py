"""PAMIQ-Core's SequentialBuffer and DictSequentialBuffer (tests/pamiq_core/data/impls)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.data import DictSequentialBuffer, SequentialBuffer


def test_init() -> None:
    buffer = SequentialBuffer[int](50)
    assert buffer.max_size == 50
    assert buffer.max_queue_size == 50
    assert len(buffer) == 0
    assert buffer.get_data() == []


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^max_queue_size must be non-negative$"):
        SequentialBuffer[int](-1)


def test_add_and_get_data_keep_the_order() -> None:
    buffer = SequentialBuffer[int](100)
    buffer.add(1)
    assert buffer.get_data() == [1]
    buffer.add(2)
    assert buffer.get_data() == [1, 2]
    assert len(buffer) == 2


def test_a_full_buffer_drops_the_oldest() -> None:
    buffer = SequentialBuffer[int](3)
    for i in range(5):
        buffer.add(i)
    assert buffer.get_data() == [2, 3, 4]
    assert len(buffer) == 3


def test_get_data_returns_a_copy() -> None:
    buffer = SequentialBuffer[int](10)
    buffer.add(1)
    buffer.get_data().append(2)
    assert buffer.get_data() == [1]


def test_save_and_load_state(tmp_path: Path) -> None:
    buffer = SequentialBuffer[torch.Tensor](4)
    for i in range(6):
        buffer.add(torch.full((2,), float(i)))
    buffer.save_state(tmp_path / "buffer")
    assert (tmp_path / "buffer.safetensors").is_file()
    restored = SequentialBuffer[torch.Tensor](4)
    restored.load_state(tmp_path / "buffer")
    assert [t.tolist() for t in restored.get_data()] == [
        [2.0, 2.0],
        [3.0, 3.0],
        [4.0] * 2,
        [5.0] * 2,
    ]
    smaller = SequentialBuffer[torch.Tensor](2)
    smaller.load_state(tmp_path / "buffer")
    assert [t[0].item() for t in smaller.get_data()] == [4.0, 5.0]  # the newest kept


def test_dict_buffer_gives_a_list_per_key() -> None:
    buffer = DictSequentialBuffer[float](["state", "action"], 2)
    assert buffer.max_size == 2
    assert buffer.max_queue_size == 2
    assert buffer.keys == {"state", "action"}
    for i in range(3):
        buffer.add({"state": float(i), "action": -float(i)})
    assert buffer.get_data() == {"state": [1.0, 2.0], "action": [-1.0, -2.0]}
    assert len(buffer) == 2


def test_dict_buffer_keys_are_a_copy() -> None:
    buffer = DictSequentialBuffer[int](["a"], 2)
    buffer.keys.add("b")
    assert buffer.keys == {"a"}


def test_dict_buffer_refuses_other_keys() -> None:
    buffer = DictSequentialBuffer[int](["a", "b"], 2)
    with pytest.raises(ValueError, match="do not match expected keys"):
        buffer.add({"a": 1})
    with pytest.raises(ValueError, match="do not match expected keys"):
        buffer.add({"a": 1, "b": 2, "c": 3})
    assert len(buffer) == 0


def test_dict_buffer_save_and_load_state(tmp_path: Path) -> None:
    buffer = DictSequentialBuffer[torch.Tensor](["obs", "act"], 3)
    for i in range(4):
        buffer.add({"obs": torch.full((2, 2), float(i)), "act": torch.tensor([i])})
    buffer.save_state(tmp_path / "b")
    restored = DictSequentialBuffer[torch.Tensor](["obs", "act"], 3)
    restored.load_state(tmp_path / "b")
    data, saved = restored.get_data(), buffer.get_data()
    assert [t.tolist() for t in data["act"]] == [[1], [2], [3]]
    for key in ("obs", "act"):
        assert all(torch.equal(a, b) for a, b in zip(data[key], saved[key], strict=True))
