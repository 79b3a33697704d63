"""PAMIQ-Core's TimestampingQueue, DataCollector and DataUser (tests/pamiq_core/data/
test_interface.py), with the real clock: `mark()` gives a time between two stamps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from shared.data import DataCollector, DataUser, SequentialBuffer
from shared.data.clock import now
from shared.data.interface import TimestampingQueue
from shared.state import PersistentStateMixin
from tests.unit.shared.data.helpers import ListBuffer, mark


def test_queue_append_and_popleft_carry_the_time() -> None:
    queue = TimestampingQueue[int](5)
    assert len(queue) == 0
    before = mark()
    queue.append(42)
    after = mark()
    assert len(queue) == 1
    data, stamp = queue.popleft()
    assert data == 42
    assert before < stamp <= after
    assert len(queue) == 0


def test_queue_keeps_order_and_its_length_bound() -> None:
    queue = TimestampingQueue[int](5)
    for i in range(7):
        queue.append(i)
    assert len(queue) == 5
    assert [queue.popleft()[0] for _ in range(5)] == [2, 3, 4, 5, 6]
    with pytest.raises(IndexError):
        queue.popleft()


def test_collected_data_reaches_the_buffer_only_on_update() -> None:
    buffer = ListBuffer[int](5)
    user = DataUser(buffer)
    user._collector.collect(42)
    assert buffer.data == []
    assert len(user) == 0
    user.update()
    assert buffer.data == [42]
    assert len(user) == 1


def test_count_data_added_since() -> None:
    user = DataUser(ListBuffer[int](5))
    marks = []
    for i in range(4):
        marks.append(mark())
        user._collector.collect(i)
        user.update()
    assert user.count_data_added_since(float("-inf")) == 4
    assert user.count_data_added_since(marks[0]) == 4
    assert user.count_data_added_since(marks[1]) == 3
    assert user.count_data_added_since(marks[3]) == 1
    assert user.count_data_added_since(mark()) == 0


def test_a_sample_stamped_at_the_time_given_is_not_new() -> None:
    user = DataUser(ListBuffer[int](5))
    user._collector.collect(1)
    user.update()
    (stamp,) = user._timestamps
    assert user.count_data_added_since(stamp) == 0  # `t <= timestamp` ends the count
    assert user.count_data_added_since(stamp - 1e-3) == 1


def test_the_buffer_and_the_queue_are_bounded() -> None:
    buffer = ListBuffer[int](5)
    user = DataUser(buffer)
    for i in range(8):  # the trainer does not update: the collector keeps the newest 5
        user._collector.collect(i)
    user.update()
    assert buffer.data == [3, 4, 5, 6, 7]
    for i in range(8, 10):
        user._collector.collect(i)
        user.update()
    assert buffer.data == [5, 6, 7, 8, 9]
    assert user.count_data_added_since(float("-inf")) == 5  # the last max_queue_size stamps


def test_get_data_updates_first() -> None:
    user = DataUser(ListBuffer[int](5))
    user._collector.collect(42)
    assert user.get_data() == [42]
    assert len(user) == 1


def test_collectors_on_many_threads_lose_nothing_within_the_bound() -> None:
    user = DataUser(SequentialBuffer[int](4000))
    collector: DataCollector[int] = user._collector

    def collect(base: int) -> None:
        for i in range(1000):
            collector.collect(base + i)

    threads = [threading.Thread(target=collect, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    updates = 0
    while any(t.is_alive() for t in threads):
        user.update()  # the training thread, concurrently
        updates += 1
    for thread in threads:
        thread.join()
    user.update()
    assert sorted(user.get_data()) == list(range(4000))


def test_save_and_load_state(tmp_path: Path) -> None:
    user = DataUser(SequentialBuffer[torch.Tensor](3))
    for i in range(4):
        user._collector.collect(torch.tensor([float(i)]))
    user.update()
    user._collector.collect(torch.tensor([4.0]))  # save_state updates first
    user.save_state(tmp_path / "data")
    assert (tmp_path / "data").is_dir()
    assert (tmp_path / "data" / "buffer.safetensors").is_file()
    saved_times = json.loads((tmp_path / "data" / "timestamps.json").read_text())
    assert saved_times == list(user._timestamps)
    assert len(saved_times) == 3

    restored = DataUser(SequentialBuffer[torch.Tensor](3))
    restored.load_state(tmp_path / "data")
    assert [t.item() for t in restored.get_data()] == [2.0, 3.0, 4.0]
    assert list(restored._timestamps) == saved_times
    assert restored.count_data_added_since(saved_times[0]) == 2
    assert restored.count_data_added_since(now()) == 0


def test_load_state_refuses_a_corrupt_times_file(tmp_path: Path) -> None:
    user = DataUser(SequentialBuffer[int](3))
    user.save_state(tmp_path / "data")
    (tmp_path / "data" / "timestamps.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match=r"timestamps\.json is not a list of times"):
        DataUser(SequentialBuffer[int](3)).load_state(tmp_path / "data")


def test_user_is_persistent() -> None:
    assert issubclass(DataUser, PersistentStateMixin)
