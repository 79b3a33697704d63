"""PAMIQ-Core's DataBuffer: where a trainer's experience is kept, with the policy for a full one.

A buffer is fed through its `DataUser` (shared/data/interface.py): collectors queue samples,
`DataUser.update()` adds them to the buffer one by one (`add`), or a block of them at once
(`add_batch`, how the experience plane's batches arrive). `max_queue_size` bounds that queue: a
collector holds at most that many samples between two updates, dropping its oldest beyond it,
so a trainer that does not keep up never grows memory without bound.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Generic, TypeVar

from shared.state import PersistentStateMixin

if TYPE_CHECKING:
    from shared.data.block import SampleBlock

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

    def add_batch(self, block: SampleBlock) -> None:
        """Add the samples of `block` (mappings of names to tensors), in order.

        By default one by one through `add`, each tensor a copy of its own: a buffer that may
        keep any of them must not keep the whole block alive for one. Buffers whose policy
        allows it take the block whole (SequentialBuffer).

        Args:
            block: The samples, as columns.
        """
        for index in range(block.count):
            self.add(block.sample(index))  # type: ignore[arg-type]

    @abstractmethod
    def get_data(self) -> R:
        """Every sample stored, as this buffer presents them."""

    @abstractmethod
    def __len__(self) -> int:
        """How many samples are stored."""
