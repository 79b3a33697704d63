"""What the data tests share: a plain list buffer, and a point in time between two stamps."""

from __future__ import annotations

from typing import Generic, TypeVar

from typing_extensions import override

from shared.data import DataBuffer
from shared.data.clock import now

T = TypeVar("T")


class ListBuffer(DataBuffer[T, list[T]], Generic[T]):
    """Keeps the last `max_size` samples in a list (PAMIQ's test buffer)."""

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.max_size = max_size
        self.data: list[T] = []

    @override
    def add(self, data: T) -> None:
        self.data.append(data)
        del self.data[: -self.max_size or None]

    @override
    def get_data(self) -> list[T]:
        return list(self.data)

    @override
    def __len__(self) -> int:
        return len(self.data)


def mark() -> float:
    """A time that every sample collected before the call is stamped at or before, and every
    sample collected after it is stamped after (the clock is read until it moves on)."""
    t = now()
    while now() <= t:
        pass
    return t
