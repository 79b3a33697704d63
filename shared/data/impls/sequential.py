"""PAMIQ-Core's SequentialBuffer: the last `max_size` samples in arrival order, oldest out first."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

from typing_extensions import override

from shared.data.buffer import DataBuffer
from shared.data.impls.keyed import KeyedBuffer
from shared.data.persist import load_samples, save_samples, state_file

T = TypeVar("T")


class SequentialBuffer(DataBuffer[T, list[T]], Generic[T]):
    """Keeps the last `max_size` samples in the order they were added."""

    def __init__(self, max_size: int) -> None:
        """Initialize the buffer.

        Args:
            max_size: The most samples kept; adding one more drops the oldest. It also bounds
                the collector's queue.

        Raises:
            ValueError: `max_size` is negative.
        """
        super().__init__(max_size)
        self._queue: deque[T] = deque(maxlen=max_size)
        self._max_size = max_size

    @property
    def max_size(self) -> int:
        """The most samples kept."""
        return self._max_size

    @override
    def add(self, data: T) -> None:
        self._queue.append(data)

    @override
    def get_data(self) -> list[T]:
        """The samples, oldest first (a new list)."""
        return list(self._queue)

    @override
    def __len__(self) -> int:
        return len(self._queue)

    @override
    def save_state(self, path: Path) -> None:
        """Save the samples to `<path>.safetensors`."""
        save_samples(state_file(path), list(self._queue))

    @override
    def load_state(self, path: Path) -> None:
        """Load the samples `save_state` saved (the last `max_size` of them)."""
        self._queue = deque(load_samples(state_file(path)), maxlen=self._max_size)


class DictSequentialBuffer(KeyedBuffer[T], Generic[T]):
    """A SequentialBuffer of mappings with fixed keys; `get_data()` gives a list per key."""

    def __init__(self, keys: Iterable[str], max_size: int) -> None:
        """Initialize the buffer.

        Args:
            keys: The keys every sample must have.
            max_size: As SequentialBuffer's.
        """
        self._sequential = SequentialBuffer[dict[str, T]](max_size)
        super().__init__(keys, self._sequential)

    @property
    def max_size(self) -> int:
        """The most samples kept."""
        return self._sequential.max_size
