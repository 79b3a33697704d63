"""The samples a RemoteDataCollector holds until they are sent: rows of per-batch slabs, each
slab the message its batch leaves in.

A slab is the experience.v1 Batch message of `batch_size` samples, laid out once per sample
layout (`Form`, wire.Layout): `collect()` copies a sample's tensors straight into their rows of
the newest slab (one memmove per tensor, the one copy it promises, and the stacking the wire
needs, at once). A full slab leaves as it is (`take_whole`): its sequence number written in, the
message is the slab's own bytes, so nothing is joined at send time; it is filled again once the
trainer acknowledged it. Fewer rows (a batch sent after `max_delay_s`, or split to the trainer's
limit) are taken as views (`take`) and joined into a message of their own. Rows are written
once, so views taken stay valid while later rows of the same slab fill. `collect_rows()` copies
many samples at once (`put_rows`): each tensor's rows for one slab in one memmove.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from shared.data.remote.memory import Filled, copier
from shared.data.remote.samples import Layout, as_tensor
from shared.data.remote.wire import batch_layout, padded_varint
from shared.dtypes import BY_TORCH


class Form:
    """A sample layout's slabs: `capacity` rows, and where each tensor's rows lie in the
    message (wire.Layout); computed once per collector."""

    def __init__(self, layout: Layout, capacity: int, buffer: str, collector_id: str) -> None:
        self.layout = layout
        self.capacity = capacity
        tensors = []
        for name, (dtype, shape) in layout.items():
            entry = BY_TORCH.get(dtype)
            if entry is None or entry.safetensors is None:
                raise ValueError(
                    f"tensor {name!r}: dtype {dtype} cannot travel in a batch (safetensors has "
                    "no such dtype)"
                )
            tensors.append((name, entry.safetensors, tuple(shape), shape.numel() * dtype.itemsize))
        self.message = batch_layout(buffer, collector_id, tensors, capacity)
        # Each tensor: name, dtype, shape, bytes per sample, offset of its rows.
        self.tensors = [
            (name, dtype, shape, nbytes, self.message.offsets[name])
            for (name, (dtype, shape)), (_, _, _, nbytes) in zip(
                layout.items(), tensors, strict=True
            )
        ]
        self.names = sorted(layout)
        self.plain = plain_keys()


def plain_keys() -> list[object]:
    """What `KEYS` reads of a tensor whose memory holds its values, in CPU memory: a plain
    CPU tensor's dispatch keys, made with autograd and without (in inference mode). A tensor
    lazily negated or conjugated, sparse, on another device or otherwise unlike them differs.

    The dispatch keys are one call that keeps the GIL: `is_neg()` and `is_conj()` release it
    (as most of torch's methods do), which at every sample hands it to any thread waiting for
    it, the collector's own sending threads first (a context switch each way)."""
    with torch.inference_mode(False):
        autograd = torch.empty(0, device="cpu")
    with torch.inference_mode():
        inference = torch.empty(0, device="cpu")
    return [KEYS(autograd), KEYS(inference)]


def _flags(tensor: torch.Tensor) -> object:
    return (tensor.is_cpu, tensor.layout, tensor.is_neg(), tensor.is_conj())


# A tensor's dispatch keys (a private torch function, there since torch 1.11); where a torch
# lacks it, what they would tell, read attribute by attribute.
KEYS: Callable[[torch.Tensor], object] = getattr(torch._C, "_dispatch_keys", _flags)


class Slab:
    """Up to `capacity` samples of one layout, written in place into their batch's message:
    `Pending.put` copies a sample's tensors straight into their rows (`rows`: where each lies),
    `take` hands the oldest rows on as views (already stacked for the wire), `seal` hands the
    whole message on."""

    def __init__(self, form: Form, created: float) -> None:
        self.form = form
        self.capacity = form.capacity
        self.memory = Filled(form.message.size)
        self.memory.write(0, form.message.head)
        self.rows = [  # each tensor: name, dtype, shape, bytes per sample, where its first
            # row lies, and the memmove to copy a row with (Pending.put)
            (name, dtype, shape, nbytes, self.memory.address + offset, copier(nbytes))
            for name, dtype, shape, nbytes, offset in form.tensors
        ]
        self.width = len(self.rows)
        self.reset(created)

    @functools.cached_property
    def columns(self) -> dict[str, torch.Tensor]:
        """Each tensor's rows as one tensor, a view of the message (made when first needed:
        a full slab leaves without them)."""
        columns = {}
        for name, dtype, shape, nbytes, offset in self.form.tensors:
            rows = (self.capacity, *shape)
            if nbytes:  # a view of the message (it keeps the message's memory alive)
                columns[name] = torch.frombuffer(
                    self.memory.buffer, dtype=dtype, count=rows[0] * shape.numel(), offset=offset
                ).view(rows)
            else:
                columns[name] = torch.empty(rows, dtype=dtype)
        return columns

    def reset(self, created: float) -> None:
        """Start empty (again: a slab is reused once its rows are sent, its memory warm)."""
        self.created = created  # when its first sample came: it waits max_delay_s at most
        self.start = 0  # rows before it were taken or dropped
        self.end = 0  # rows before it hold samples

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def whole(self) -> bool:
        """Whether every row holds a sample and none was taken or dropped."""
        return self.end == self.capacity and not self.start

    def put_other(self, data: Mapping[str, Any], name: str, value: Any, row: int) -> None:
        """Copy a value that is not a plain tensor of the layout (numpy, a number, a view, on
        another device, ...) into its row, or say why it does not fit."""
        if value is None:
            raise ValueError(f"sample names {sorted(data)} differ from {self.form.names}")
        dtype, shape = self.form.layout[name]
        tensor = as_tensor(value, name)
        if tensor.dtype is not dtype or tensor.shape != shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, not {dtype} {list(shape)}"
            )
        try:
            self.columns[name][row].copy_(tensor.detach())
        except RuntimeError as exc:  # a layout torch cannot copy from (sparse and the like)
            raise ValueError(f"tensor {name!r} cannot be copied: {exc}") from None

    def take(self, count: int) -> dict[str, torch.Tensor]:
        """The oldest `count` rows, each tensor's as one view."""
        begin, self.start = self.start, self.start + count
        return {name: column[begin : self.start] for name, column in self.columns.items()}

    def seal(self, sequence: int) -> bytes:
        """The whole slab as the message of batch `sequence` (its rows all taken)."""
        self.memory.write(self.form.message.sequence_at, padded_varint(sequence))
        self.start = self.end
        return self.memory.data

    @property
    def unshared(self) -> bool:
        """Whether nothing refers to its message but the slab (it may be filled again)."""
        return self.memory.unshared


SPARE_SLABS = 2


class Pending:
    """The samples waiting to be sent, oldest first, in slabs of `batch_size` rows, each slab
    the message of batch `buffer` from `collector_id`."""

    def __init__(
        self, layout: Layout, batch_size: int, buffer: str = "", collector_id: str = ""
    ) -> None:
        self.layout = layout
        self._form = Form(layout, batch_size, buffer, collector_id)
        self._slabs: deque[Slab] = deque()
        self._spare: list[Slab] = []  # slabs whose rows were all sent, to fill again
        self._open: Slab | None = None  # the newest slab, while it has rows to fill
        self.count = 0

    @property
    def payload_bytes(self) -> int:
        """The payload of a whole slab's batch."""
        return self._form.message.payload_bytes

    def put(self, data: Mapping[str, Any], now: float | None = None) -> bool:
        """Copy one sample into the next row (at `now`, time.monotonic() by default); whether
        it filled a batch.

        The hot path: one call for the whole sample, and not one that releases the GIL. A
        plain tensor of the layout (of the layout's dtype and shape, its dispatch keys a plain
        CPU tensor's, contiguous) is copied with one memmove; anything else goes through
        `put_other`, which converts it or says why it does not fit. Every sample is checked
        so, the first as every later one.

        Raises:
            ValueError: Its names, dtypes or shapes differ from the layout.
        """
        slab = self._open
        if slab is None:
            slab = self._open = self._fresh(time.monotonic() if now is None else now)
            self._slabs.append(slab)
        row = slab.end
        try:
            if len(data) != slab.width:
                raise ValueError(f"sample names {sorted(data)} differ from {self._form.names}")
            plain = self._form.plain
            for name, dtype, shape, nbytes, first, copy in slab.rows:
                value = data.get(name)
                if (
                    type(value) is torch.Tensor
                    and value.dtype is dtype
                    and value.shape == shape
                    and KEYS(value) in plain
                    and value.is_contiguous()
                ):
                    copy(first + row * nbytes, value.data_ptr(), nbytes)
                else:
                    slab.put_other(data, name, value, row)
        except ValueError:
            if not len(slab):  # it took no sample: give it back
                self._slabs.pop()
                self._open = None
                self.reuse(slab)
            raise
        row += 1
        slab.end = row
        self.count += 1
        if row == slab.capacity:
            self._open = None  # full: the next sample starts another
            return True
        return False

    def columns_of(self, data: Mapping[str, Any], count: int) -> list[torch.Tensor]:
        """`data`'s tensors as `put_rows` copies them, in the layout's order: each one's
        `count` rows, each row of the layout's dtype and shape, as a contiguous CPU tensor
        (the value itself when it is one; anything else converted, one copy more).

        Raises:
            ValueError: Its names, dtypes or per-row shapes differ from the layout, or a
                tensor cannot be copied (sparse and the like).
        """
        if len(data) != len(self.layout) or any(name not in data for name in self.layout):
            raise ValueError(f"sample names {sorted(data)} differ from {self._form.names}")
        columns = []
        for name, (dtype, shape) in self.layout.items():
            tensor = as_tensor(data[name], name)
            if tensor.dtype is not dtype or tensor.shape[1:] != shape or tensor.ndim < 1:
                raise ValueError(
                    f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)[1:]} a row, not "
                    f"{dtype} {list(shape)}"
                )
            if len(tensor) != count:
                raise ValueError(f"tensor {name!r} holds {len(tensor)} rows, not {count}")
            if tensor.layout is not torch.strided:
                raise ValueError(f"tensor {name!r} cannot be copied: layout {tensor.layout}")
            if tensor.device.type != "cpu" or tensor.is_neg() or tensor.is_conj():
                try:
                    tensor = tensor.detach().resolve_neg().resolve_conj().cpu()
                except RuntimeError as exc:  # a device with no data (meta) and the like
                    raise ValueError(f"tensor {name!r} cannot be copied: {exc}") from None
            columns.append(tensor if tensor.is_contiguous() else tensor.contiguous())
        return columns

    def put_rows(
        self, columns: Sequence[torch.Tensor], first: int, count: int, now: float | None = None
    ) -> tuple[int, bool]:
        """Copy rows `first` to `first + count` of `columns` (`columns_of`) into the newest
        slab, as many as it has room for, with one copy per tensor (releasing the GIL when
        large, memory.copier); how many it took and whether that filled a batch."""
        slab = self._open
        if slab is None:
            slab = self._open = self._fresh(time.monotonic() if now is None else now)
            self._slabs.append(slab)
        row = slab.end
        put = min(count, slab.capacity - row)
        for (_, _, _, nbytes, start, _), column in zip(slab.rows, columns, strict=True):
            if nbytes:
                size = put * nbytes
                copier(size)(start + row * nbytes, column.data_ptr() + first * nbytes, size)
        slab.end = row + put
        self.count += put
        if slab.end == slab.capacity:
            self._open = None  # full: the next sample starts another
            return put, True
        return put, False

    @property
    def capacity(self) -> int:
        """The samples a slab holds."""
        return self._form.capacity

    @property
    def room(self) -> int:
        """The rows the newest slab has left to fill (0: the next sample starts another)."""
        return self._open.capacity - self._open.end if self._open is not None else 0

    def _fresh(self, now: float) -> Slab:
        """A slab to fill: one given back whose message nothing refers to (one still referred
        to stays for later), or a new one."""
        for index, slab in enumerate(self._spare):
            if slab.unshared:
                del self._spare[index]
                slab.reset(now)
                return slab
        return Slab(self._form, now)

    @property
    def oldest(self) -> float:
        """When the oldest waiting sample's slab took its first sample."""
        return self._slabs[0].created

    def take_whole(self, most: int, max_bytes: int | None) -> Slab | None:
        """The oldest slab, if it is whole and may go as one batch of at most `most` samples
        and `max_bytes` payload bytes: `seal` it, and `reuse` it once acknowledged."""
        slab = self._slabs[0] if self._slabs else None
        if slab is None or not slab.whole or most < slab.capacity:
            return None
        if max_bytes is not None and self.payload_bytes > max_bytes:
            return None
        self._slabs.popleft()
        self.count -= slab.capacity
        return slab

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
        if slab is self._open:
            self._open = None
        return columns, count, slab

    def reuse(self, slab: Slab | None) -> None:
        """Fill `slab` again, its rows no longer used (fresh memory costs a page fault per
        page it touches; reused, none), once nothing else refers to its message."""
        if slab is not None and len(self._spare) < SPARE_SLABS and slab not in self._spare:
            self._spare.append(slab)

    def drop_oldest(self, count: int = 1) -> None:
        """Forget the `count` oldest waiting samples (a slab this empties is not reused: the
        sending thread may still be framing rows it took from it before)."""
        while count > 0 and self._slabs:
            slab = self._slabs[0]
            gone = min(count, len(slab))
            slab.start += gone
            self.count -= gone
            count -= gone
            if not slab:
                self._slabs.popleft()  # a slab emptied is not filled on: its time is past
                if slab is self._open:
                    self._open = None

    def clear(self) -> int:
        """Forget every waiting sample; how many there were."""
        count, self.count = self.count, 0
        self._slabs.clear()
        self._open = None
        return count
