"""The samples a RemoteDataCollector holds until they are sent: rows of per-batch slabs.

`collect()` copies a sample's tensors straight into the next row of the newest slab (one
preallocated tensor per name, `batch_size` rows): the one copy it promises, and the stacking
the wire needs, at once. The sending thread takes the oldest rows as views, already a batch.
Rows are written once, so views taken stay valid while later rows of the same slab fill.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shared.data.remote.samples import Layout, as_tensor


class Slab:
    """Up to `capacity` samples of one layout, each tensor's samples stacked in one preallocated
    tensor: `put` copies a sample's tensors straight into their rows (the one copy `collect()`
    makes), and `take` hands the oldest rows on as views, already stacked for the wire. Rows are
    written once, so views taken stay valid while later rows fill."""

    def __init__(self, layout: Layout, capacity: int, created: float) -> None:
        self.layout = layout
        self.columns = {n: torch.empty((capacity, *s), dtype=d) for n, (d, s) in layout.items()}
        self._rows = []  # each name: dtype, shape, rows to write, whether one element
        for n, (d, s) in layout.items():
            rows = _rows(self.columns[n])
            self._rows.append((n, d, s, rows, rows is not None and s.numel() == 1))
        self.capacity = capacity
        self.reset(created)

    def reset(self, created: float) -> None:
        """Start empty (again: a slab is reused once its rows are sent, its memory warm)."""
        self.created = created  # when its first sample came: it waits max_delay_s at most
        self.start = 0  # rows before it were taken or dropped
        self.end = 0  # rows before it hold samples

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def full(self) -> bool:
        return self.end == self.capacity

    def put(self, data: Mapping[str, Any]) -> None:
        """Copy one sample into the next row.

        Raises:
            ValueError: Its names, dtypes or shapes differ from the layout.
        """
        if len(data) != len(self._rows):
            raise ValueError(f"sample names {sorted(data)} differ from {sorted(self.layout)}")
        row = self.end
        for name, dtype, shape, rows, scalar in self._rows:  # the hot path: few calls a tensor
            value = data.get(name)
            if type(value) is not torch.Tensor:
                if value is None:
                    raise ValueError(
                        f"sample names {sorted(data)} differ from {sorted(self.layout)}"
                    )
                value = as_tensor(value)
            if value.dtype is not dtype or value.shape != shape:
                raise ValueError(
                    f"tensor {name!r} is {value.dtype} {list(value.shape)}, not {dtype} "
                    f"{list(shape)}"
                )
            if rows is None:  # a dtype numpy lacks
                self.columns[name][row].copy_(value.detach())
            elif scalar:  # one element: a Python number converts back exactly, and costs less
                rows[row] = value.item()
            else:  # numpy's copy: the cheapest call per tensor
                try:
                    rows[row] = value.numpy()
                except (RuntimeError, TypeError):  # needs grad, not on the CPU, a lazy view
                    rows[row] = value.detach().cpu().resolve_conj().resolve_neg().numpy()
        self.end = row + 1

    def take(self, count: int) -> dict[str, torch.Tensor]:
        """The oldest `count` rows, each tensor's as one view."""
        begin, self.start = self.start, self.start + count
        return {name: column[begin : self.start] for name, column in self.columns.items()}


def _rows(column: torch.Tensor) -> np.ndarray | None:
    """What `put` writes a column's rows through: the column as a numpy array (indexing it
    costs far less than a torch view); None for a dtype numpy lacks (bfloat16 and the like)."""
    try:
        return column.numpy()
    except TypeError:
        return None


SPARE_SLABS = 2


class Pending:
    """The samples waiting to be sent, oldest first, in slabs of `batch_size` rows."""

    def __init__(self, layout: Layout, batch_size: int) -> None:
        self.layout = layout
        self._batch_size = batch_size
        self._slabs: deque[Slab] = deque()
        self._spare: list[Slab] = []  # slabs whose rows were all sent, to fill again
        self.count = 0

    def put(self, data: Mapping[str, Any], now: float | None = None) -> bool:
        """Copy one sample in (at `now`, time.monotonic() by default); whether it filled a
        batch.

        Raises:
            ValueError: Its names, dtypes or shapes differ from the layout.
        """
        slab = self._slabs[-1] if self._slabs else None
        if slab is None or slab.full:
            now = time.monotonic() if now is None else now
            if self._spare:
                slab = self._spare.pop()
                slab.reset(now)
            else:
                slab = Slab(self.layout, self._batch_size, now)
            self._slabs.append(slab)
        try:
            slab.put(data)
        except ValueError:
            if not slab:
                self._slabs.pop()
            raise
        self.count += 1
        return slab.full

    @property
    def oldest(self) -> float:
        """When the oldest waiting sample's slab took its first sample."""
        return self._slabs[0].created

    def take(self, most: int) -> tuple[dict[str, torch.Tensor], int, Slab | None]:
        """Up to `most` of the oldest samples (those of the oldest slab), stacked, as views;
        how many; and the slab this emptied, if any: `reuse` it once the views are unused."""
        slab = self._slabs[0]
        count = min(most, len(slab))
        columns = slab.take(count)
        self.count -= count
        if slab:
            return columns, count, None
        self._slabs.popleft()  # a slab emptied is not filled on: its time is past
        return columns, count, slab

    def reuse(self, slab: Slab | None) -> None:
        """Fill `slab` again, its rows no longer used (fresh memory costs a page fault per
        page it touches; reused, none)."""
        if slab is not None and len(self._spare) < SPARE_SLABS:
            self._spare.append(slab)

    def drop_oldest(self) -> None:
        """Forget the oldest waiting sample (a slab this empties is not reused: the sending
        thread may still be framing rows it took from it before)."""
        self.take(1)

    def clear(self) -> int:
        """Forget every waiting sample; how many there were."""
        count, self.count = self.count, 0
        self._slabs.clear()
        return count
