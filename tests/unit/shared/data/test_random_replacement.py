"""PAMIQ-Core's RandomReplacementBuffer and its dict form (tests/pamiq_core/data/impls)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shared.data import DictRandomReplacementBuffer, RandomReplacementBuffer


def test_init() -> None:
    buffer = RandomReplacementBuffer[int](10)
    assert buffer.max_size == 10
    assert buffer.replace_probability == 1.0
    assert buffer.max_queue_size == 10
    assert len(buffer) == 0
    assert not buffer.is_full
    half = RandomReplacementBuffer[int](10, replace_probability=0.5)
    assert half.replace_probability == 0.5
    assert half.max_queue_size == 20  # max_size / p: what can still land in a full buffer


@pytest.mark.parametrize("probability", [-0.1, 1.1])
def test_probability_outside_0_1_is_refused(probability: float) -> None:
    with pytest.raises(ValueError, match=r"^replace_probability must be between 0\.0 and 1\.0"):
        RandomReplacementBuffer[int](10, replace_probability=probability)


def test_zero_probability_bounds_the_queue_by_the_size() -> None:
    buffer = RandomReplacementBuffer[int](3, replace_probability=0.0)
    assert buffer.max_queue_size == 3
    for i in range(10):
        buffer.add(i)
    assert buffer.get_data() == [0, 1, 2]


def test_expected_survival_length_sets_the_probability() -> None:
    buffer = RandomReplacementBuffer[int](10, expected_survival_length=20)
    expected = RandomReplacementBuffer.compute_replace_probability_from_expected_survival_length(
        10, 20
    )
    assert buffer.replace_probability == expected
    assert 0.0 <= expected <= 1.0


def test_both_probability_and_survival_length_are_refused() -> None:
    with pytest.raises(ValueError, match="Cannot specify both replace_probability and expected"):
        RandomReplacementBuffer[int](10, replace_probability=0.5, expected_survival_length=20)


@pytest.mark.parametrize(
    ("max_size", "survival"), [(10, 5), (10, 10), (10, 20), (100, 50), (100, 200), (50, 100)]
)
def test_computed_probability_is_in_range(max_size: int, survival: int) -> None:
    p = RandomReplacementBuffer.compute_replace_probability_from_expected_survival_length(
        max_size, survival
    )
    assert 0.0 <= p <= 1.0


def test_add_and_get_data() -> None:
    buffer = RandomReplacementBuffer[int](5)
    buffer.add(1)
    assert buffer.get_data() == [1]
    buffer.add(2)
    assert buffer.get_data() == [1, 2]
    assert len(buffer) == 2


def test_is_full() -> None:
    buffer = RandomReplacementBuffer[int](3)
    for i in range(3):
        assert not buffer.is_full
        buffer.add(i)
    assert buffer.is_full


def test_a_full_buffer_replaces_a_random_sample() -> None:
    buffer = RandomReplacementBuffer[str](2)
    buffer.add("A")
    buffer.add("B")
    random.seed(3)
    expected_index = random.Random(3)
    expected_index.random()  # the draw that decides whether to replace (p = 1: always)
    index = expected_index.randint(0, 1)
    buffer.add("C")
    data = buffer.get_data()
    assert data[index] == "C"
    assert data[1 - index] == ["A", "B"][1 - index]
    assert len(buffer) == 2


def test_a_full_buffer_drops_new_samples_at_the_rate_1_minus_p() -> None:
    buffer = RandomReplacementBuffer[int](10, replace_probability=0.3)
    for i in range(10):
        buffer.add(i)
    random.seed(0)
    draws = random.Random(0)
    replaced = 0
    for i in range(10, 1010):
        before = buffer.get_data()
        buffer.add(i)
        kept = draws.random() <= 0.3
        if kept:
            draws.randint(0, 9)
            replaced += 1
            assert i in buffer.get_data()
        else:
            assert buffer.get_data() == before
    assert 230 < replaced < 370  # about 300 of 1000


def test_get_data_returns_a_copy() -> None:
    buffer = RandomReplacementBuffer[int](5)
    buffer.add(1)
    buffer.get_data().append(2)
    assert buffer.get_data() == [1]


def test_save_and_load_state(tmp_path: Path) -> None:
    buffer = RandomReplacementBuffer[torch.Tensor](5)
    buffer.add(torch.tensor([1, 2]))
    buffer.add(torch.tensor([3, 4]))
    buffer.save_state(tmp_path / "test_buffer")
    assert (tmp_path / "test_buffer.safetensors").is_file()
    restored = RandomReplacementBuffer[torch.Tensor](5)
    restored.load_state(tmp_path / "test_buffer")
    assert [t.tolist() for t in restored.get_data()] == [[1, 2], [3, 4]]
    assert len(restored) == 2
    smaller = RandomReplacementBuffer[torch.Tensor](max_size=1)
    smaller.load_state(tmp_path / "test_buffer")
    assert [t.tolist() for t in smaller.get_data()] == [[1, 2]]  # truncated to max_size


def test_dict_buffer() -> None:
    buffer = DictRandomReplacementBuffer[int](["a", "b"], 4, replace_probability=0.5)
    assert buffer.max_size == 4
    assert buffer.max_queue_size == 8
    buffer.add({"a": 1, "b": 2})
    buffer.add({"a": 3, "b": 4})
    assert buffer.get_data() == {"a": [1, 3], "b": [2, 4]}
    with pytest.raises(ValueError, match="do not match expected keys"):
        buffer.add({"a": 5})
    assert len(buffer) == 2
