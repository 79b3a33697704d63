"""The mapping form of a buffer: samples map fixed keys to values; `get_data()`, a list per key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

from typing_extensions import override

from shared.data.block import SampleBlock
from shared.data.buffer import DataBuffer

T = TypeVar("T")


class KeyedBuffer(DataBuffer[Mapping[str, T], dict[str, list[T]]], Generic[T]):
    """Stores mappings with exactly `keys` in `inner`, which decides what a full buffer keeps."""

    def __init__(
        self, keys: Iterable[str], inner: DataBuffer[dict[str, T], list[dict[str, T]]]
    ) -> None:
        self._buffer = inner
        super().__init__(inner.max_queue_size)
        self._keys = set(keys)

    @property
    def keys(self) -> set[str]:
        """The keys every sample must have (a copy)."""
        return self._keys.copy()

    @override
    def add(self, data: Mapping[str, T]) -> None:
        """Add one sample.

        Args:
            data: The sample: a value for each key, and no other key.

        Raises:
            ValueError: The sample's keys are not the buffer's.
        """
        if set(data.keys()) != self._keys:
            raise ValueError(
                f"Data keys {set(data.keys())} do not match expected keys {self._keys}"
            )
        self._buffer.add(dict(data))

    @override
    def add_batch(self, block: SampleBlock) -> None:
        """Add the samples of `block` through the inner buffer, which decides whether it keeps
        the block whole.

        Raises:
            ValueError: The block's names are not the buffer's keys.
        """
        if set(block.columns) != self._keys:
            raise ValueError(
                f"Data keys {set(block.columns)} do not match expected keys {self._keys}"
            )
        self._buffer.add_batch(block)

    @override
    def get_data(self) -> dict[str, list[T]]:
        """A list of values per key, the samples in the inner buffer's order."""
        out: dict[str, list[T]] = {k: [] for k in self._keys}
        for data in self._buffer.get_data():
            for k, v in data.items():
                out[k].append(v)
        return out

    @override
    def __len__(self) -> int:
        return len(self._buffer)

    @override
    def save_state(self, path: Path) -> None:
        self._buffer.save_state(path)

    @override
    def load_state(self, path: Path) -> None:
        self._buffer.load_state(path)
