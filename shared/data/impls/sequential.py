"""PAMIQ-Core's SequentialBuffer: the last `max_size` samples in arrival order, oldest out first.

Samples added one by one are kept as given; a block of them (`add_batch`, what the experience
plane stores) is kept whole and indexed into, so adding it costs a few Python calls whatever
its size. A block lives until its last sample is dropped: the memory held is at most
`max_size` samples plus one block's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from typing_extensions import override

from shared.data.block import SampleBlock, is_block
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
        self._queue: deque[Any] = deque()  # samples, and blocks of them (SampleBlock)
        self._count = 0
        self._max_size = max_size

    @property
    def max_size(self) -> int:
        """The most samples kept."""
        return self._max_size

    @override
    def add(self, data: T) -> None:
        self._queue.append(data)
        self._count += 1
        self._trim()

    @override
    def add_batch(self, block: SampleBlock) -> None:
        """Add the samples of `block` in order, keeping the block (its samples are views)."""
        if block.count:
            self._queue.append(block)
            self._count += block.count
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest samples beyond `max_size`."""
        while self._count > self._max_size:
            first = self._queue[0]
            over = self._count - self._max_size
            if is_block(first) and first.count > over:
                self._queue[0] = first.tail(over)
                self._count -= over
            else:
                self._queue.popleft()
                self._count -= first.count if is_block(first) else 1

    @override
    def get_data(self) -> list[T]:
        """The samples, oldest first (a new list)."""
        out: list[T] = []
        for item in self._queue:
            if is_block(item):
                out.extend(cast("list[T]", item.rows()))
            else:
                out.append(item)
        return out

    @override
    def __len__(self) -> int:
        return self._count

    @override
    def save_state(self, path: Path) -> None:
        """Save the samples to `<path>.safetensors`."""
        save_samples(state_file(path), self.get_data())

    @override
    def load_state(self, path: Path) -> None:
        """Load the samples `save_state` saved (the last `max_size` of them)."""
        samples = load_samples(state_file(path))
        self._queue = deque(samples)
        self._count = len(samples)
        self._trim()


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
