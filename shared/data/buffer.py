"""PAMIQ-Core's DataBuffer: where a trainer's experience is kept, with the policy for a full one.

A buffer is fed through its `DataUser` (shared/data/interface.py): collectors queue samples,
`DataUser.update()` adds them to the buffer one by one. `max_queue_size` bounds that queue: a
collector holds at most that many samples between two updates, dropping its oldest beyond it,
so a trainer that does not keep up never grows memory without bound.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from shared.state import PersistentStateMixin

T = TypeVar("T")
R = TypeVar("R")


class DataBuffer(ABC, PersistentStateMixin, Generic[T, R]):
    """Stores samples of type `T`; `get_data()` returns them as an `R`.

    Override `add`, `get_data` and `__len__` (and `save_state` / `load_state` to persist).
    """

    def __init__(self, max_queue_size: int | None = None) -> None:
        """Initialize the buffer.

        Args:
            max_queue_size: The most samples its collector queues between two updates; None
                for no limit (warned about: memory grows while the trainer does not update).

        Raises:
            ValueError: `max_queue_size` is negative.
        """
        super().__init__()
        if max_queue_size is not None:
            if max_queue_size < 0:
                raise ValueError("max_queue_size must be non-negative")
        else:
            warnings.warn(
                "max_queue_size is None. The collector's queue will have unlimited size, "
                "which may cause memory issues if data collection is faster than processing.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._max_queue_size = max_queue_size

    @property
    def max_queue_size(self) -> int | None:
        """The most samples the collector queues between two updates (None: no limit)."""
        return self._max_queue_size

    @abstractmethod
    def add(self, data: T) -> None:
        """Add one sample.

        Args:
            data: The sample.
        """

    @abstractmethod
    def get_data(self) -> R:
        """Every sample stored, as this buffer presents them."""

    @abstractmethod
    def __len__(self) -> int:
        """How many samples are stored."""
