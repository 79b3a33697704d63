"""Samples handed over as columns: a block of `count` samples, each name's tensors stacked.

The experience plane stores a batch as one block (one copy per tensor, out of the message)
rather than as `count` samples of their own: a block costs a few Python calls whatever its
size. A buffer takes it with `DataBuffer.add_batch`: a sequential buffer keeps the block and
indexes into it (it drops samples oldest first, so a block lives only until its last sample
goes); any other buffer, by default, takes its samples one by one, each a copy of its own (a
random-replacement buffer keeps any sample, and a view would keep its whole block alive).

torch is imported on first use: the data API itself does not need it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


class SampleBlock:
    """`count` samples (at least one), as one tensor per name, the samples along its first
    dimension. The tensors are the block's own: nothing else writes them."""

    def __init__(
        self,
        columns: Mapping[str, torch.Tensor],
        count: int,
        rows: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.columns = columns
        self.count = count
        self._rows = rows

    def rows(self) -> list[dict[str, torch.Tensor]]:
        """Each sample as a mapping of names to views of the block (they keep it alive); made
        once, on the first call (a buffer's `get_data` asks on every training run)."""
        if self._rows is None:
            names = list(self.columns)
            unbound = [column.unbind(0) for column in self.columns.values()]
            self._rows = [dict(zip(names, row, strict=True)) for row in zip(*unbound, strict=True)]
        return self._rows

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index`, each tensor a copy of its own (it does not keep the block alive)."""
        return {name: copy(column[index]) for name, column in self.columns.items()}

    def tail(self, start: int) -> SampleBlock:
        """The samples from `start` on (views of this block)."""
        return SampleBlock(
            {name: column[start:] for name, column in self.columns.items()},
            self.count - start,
            None if self._rows is None else self._rows[start:],
        )

    @property
    def nbytes(self) -> int:
        """The bytes its samples take."""
        return sum(column.nbytes for column in self.columns.values())


def block_of(columns: Mapping[str, torch.Tensor]) -> SampleBlock:
    """A block owning a copy of `columns` (tensors of equal first size, at least one sample):
    one copy per tensor, whatever the sample count.

    Raises:
        ValueError: There are no columns, or their first sizes differ or are zero.
    """
    counts = {len(column) for column in columns.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"a block needs columns of one non-zero first size, not {counts}")
    return SampleBlock({name: copy(c) for name, c in columns.items()}, counts.pop())


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` (on the CPU) with memory of its own, made by one memcpy on this
    thread: torch's `clone` splits a large copy across its intra-op threads, which on a busy
    machine costs several times the copy itself."""
    import numpy as np
    import torch

    try:
        array = tensor.detach().numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16 and the like)
        return tensor.clone()
    return torch.from_numpy(np.array(array))


def copy_bytes(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of `dtype` and `shape` (as many bytes as `data` holds) with memory of its own,
    holding a copy of `data` made by one memcpy on this thread, as `copy` makes it."""
    import numpy as np
    import torch

    kind = _numpy_dtype(dtype)
    if kind is None or not len(data):  # a dtype numpy lacks (bfloat16 and the like)
        out = torch.empty(shape, dtype=dtype)
        if len(data):
            out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        return out
    return torch.from_numpy(np.frombuffer(data, dtype=kind).copy()).reshape(shape)


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any] | None:
    import torch

    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return None


def is_block(value: object) -> bool:
    return type(value) is SampleBlock
