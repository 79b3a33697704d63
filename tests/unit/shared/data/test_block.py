"""Blocks of samples (what the experience plane stores a batch as): a sequential buffer keeps them
whole and drops their samples oldest first, any other buffer takes them one by one in memory of
their own, and the collector's queue and the user's times count their samples one by one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shared.data import DataUser, DictRandomReplacementBuffer, DictSequentialBuffer
from shared.data.block import SampleBlock, block_of
from shared.data.clock import now
from shared.data.impls.sequential import SequentialBuffer
from shared.data.interface import TimestampingQueue


def block(first: int, count: int) -> SampleBlock:
    ids = torch.arange(first, first + count)
    return block_of({"x": ids.float().unsqueeze(1).repeat(1, 2), "id": ids})


def ids(data: dict[str, list[torch.Tensor]]) -> list[int]:
    return [int(t) for t in data["id"]]


def test_a_block_owns_a_copy_of_its_columns() -> None:
    source = {"x": torch.zeros(3, 2), "id": torch.arange(3)}
    made = block_of(source)
    source["x"] += 1
    assert made.count == 3
    assert made.columns["x"].tolist() == [[0.0, 0.0]] * 3
    assert made.nbytes == 3 * 2 * 4 + 3 * 8
    with pytest.raises(ValueError, match="one non-zero first size"):
        block_of({"x": torch.zeros(3, 2), "id": torch.arange(2)})
    with pytest.raises(ValueError, match="one non-zero first size"):
        block_of({"x": torch.zeros(0, 2)})


def test_a_sequential_buffer_keeps_blocks_and_singles_in_order_dropping_the_oldest() -> None:
    buffer = DictSequentialBuffer[torch.Tensor](["x", "id"], 5)
    buffer.add({"x": torch.zeros(2), "id": torch.tensor(-1)})
    buffer.add_batch(block(0, 3))
    assert len(buffer) == 4
    assert ids(buffer.get_data()) == [-1, 0, 1, 2]
    buffer.add_batch(block(3, 3))  # over by one: the single sample goes
    assert ids(buffer.get_data()) == [1, 2, 3, 4, 5]
    buffer.add_batch(block(6, 2))  # the first block's oldest go, its newest stays
    assert (len(buffer), ids(buffer.get_data())) == (5, [3, 4, 5, 6, 7])
    buffer.add_batch(block(8, 9))  # a block larger than the buffer keeps its newest
    data = buffer.get_data()
    assert ids(data) == [12, 13, 14, 15, 16]
    assert [t.tolist() for t in data["x"]] == [[float(i)] * 2 for i in range(12, 17)]
    buffer.add({"x": torch.zeros(2), "id": torch.tensor(99)})
    assert ids(buffer.get_data()) == [13, 14, 15, 16, 99]
    # A block's samples are made once: each training run's get_data reuses them.
    assert buffer.get_data()["x"][0] is buffer.get_data()["x"][0]


def test_a_sequential_buffer_refuses_a_block_of_other_names() -> None:
    buffer = DictSequentialBuffer[torch.Tensor](["x", "id"], 5)
    with pytest.raises(ValueError, match="do not match expected keys"):
        buffer.add_batch(block_of({"x": torch.zeros(2, 2)}))
    assert len(buffer) == 0


def test_a_sequential_buffer_of_size_zero_keeps_nothing() -> None:
    buffer = SequentialBuffer[dict[str, torch.Tensor]](0)
    buffer.add_batch(block(0, 3))
    buffer.add({"id": torch.tensor(1)})
    assert (len(buffer), buffer.get_data()) == (0, [])


def test_a_sequential_buffer_of_blocks_saves_and_loads_its_samples(tmp_path: Path) -> None:
    buffer = DictSequentialBuffer[torch.Tensor](["x", "id"], 4)
    buffer.add_batch(block(0, 3))
    buffer.add_batch(block(3, 3))
    buffer.save_state(tmp_path / "buffer")
    loaded = DictSequentialBuffer[torch.Tensor](["x", "id"], 3)
    loaded.load_state(tmp_path / "buffer")
    assert ids(loaded.get_data()) == [3, 4, 5]  # the last max_size of them
    loaded.add_batch(block(6, 1))
    assert ids(loaded.get_data()) == [4, 5, 6]


def test_a_random_replacement_buffer_takes_a_block_as_it_takes_samples_one_by_one() -> None:
    one_by_one = DictRandomReplacementBuffer[torch.Tensor](["x", "id"], 4, 0.5)
    whole = DictRandomReplacementBuffer[torch.Tensor](["x", "id"], 4, 0.5)
    random.seed(7)
    for sample in block(0, 20).rows():
        one_by_one.add(sample)
    random.seed(7)
    whole.add_batch(block(0, 20))
    assert ids(whole.get_data()) == ids(one_by_one.get_data())
    kept = whole.get_data()["x"]
    # Each sample kept is a copy of its own: none keeps the block alive.
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in kept)


def test_the_collector_queue_counts_a_blocks_samples_and_drops_the_oldest() -> None:
    queue = TimestampingQueue[dict[str, torch.Tensor]](5)
    queue.append({"id": torch.tensor(-1)})
    queue.append_block(block(0, 3))
    queue.append_block(block(3, 3))  # over by two: the single goes, and block 0's first
    assert (len(queue), queue.entries) == (5, 2)
    first, _ = queue.popleft()
    assert isinstance(first, SampleBlock)
    assert first.columns["id"].tolist() == [1, 2]
    assert len(queue) == 3


def test_a_user_counts_the_samples_of_a_block_as_added_at_its_time() -> None:
    user = DataUser(DictSequentialBuffer[torch.Tensor](["x", "id"], 100))
    collector = user._collector
    before = now()
    collector.collect({"x": torch.zeros(2), "id": torch.tensor(-1)})
    collector.collect_batch(block(0, 4))
    user.update()
    assert len(user) == 5
    assert user.count_data_added_since(before) == 5
    assert ids(user.get_data()) == [-1, 0, 1, 2, 3]
