"""PAMIQ-Core's DataBuffer (tests/pamiq_core/data/test_buffer.py)."""

from __future__ import annotations

import pytest

from shared.data import DataBuffer
from shared.state import PersistentStateMixin
from tests.unit.shared.data.helpers import ListBuffer


def test_shape() -> None:
    assert issubclass(DataBuffer, PersistentStateMixin)
    assert DataBuffer.__abstractmethods__ == frozenset({"add", "get_data", "__len__"})


def test_max_queue_size() -> None:
    assert ListBuffer[int](1000).max_queue_size == 1000
    assert ListBuffer[int](0).max_queue_size == 0


def test_negative_max_queue_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^max_queue_size must be non-negative$"):
        ListBuffer[int](-1)


class Unbounded(ListBuffer[int]):
    def __init__(self) -> None:
        DataBuffer.__init__(self, None)
        self.max_size = 10
        self.data = []


def test_an_unbounded_queue_is_warned_about() -> None:
    with pytest.warns(RuntimeWarning, match="max_queue_size is None. The collector's queue"):
        buffer = Unbounded()
    assert buffer.max_queue_size is None
