"""The agent's batch layout, recognised once: Collect's fast path for the messages that repeat it.

A RemoteDataCollector lays out every full batch of a buffer the same way (`batch_layout`,
shared/data/remote/wire.py): a message of the same size, the same bytes up to the tensors' data
but for the sequence number (a varint padded to ten bytes, at a fixed place). The first message
of a stream is parsed and checked whole (`parse_batch`, then `decode_columns` against the
buffer's schema) and stored; if it is exactly what `batch_layout` lays out for its buffer,
collector id and tensors, that layout is remembered (`Known`) with where each tensor's data
lies. A later message of the same size whose bytes before the data equal the layout's but for
a ten-byte sequence number is that batch with another sequence number and other data: nothing
in it needs parsing or checking again, and its tensors are copied straight out of the message.
Any other message (another layout, a batch sent early with fewer samples, anything malformed)
takes the full path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.data.batch import BatchSchema, decode_columns
from shared.data.block import SampleBlock, copy_bytes
from shared.data.remote.wire import SEQUENCE_BYTES, Received, batch_layout, padded_varint

if TYPE_CHECKING:
    import torch

SEQUENCE_MASK = (1 << 64) - 1  # what protobuf keeps of a uint64 varint (as parse_batch does)


@dataclass(frozen=True)
class Slot:
    """One tensor of a known layout: its name, dtype, stacked shape and bytes in the message."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Known:
    """A batch layout checked once: the message's size, its bytes before the sequence number
    and from after it up to the data, and its buffer, collector id, sample count, payload size
    and tensors (in the buffer's order)."""

    size: int
    before: bytes
    after: bytes
    sequence_at: int
    buffer: str
    collector_id: str
    count: int
    payload_bytes: int
    slots: tuple[Slot, ...]

    def sequence(self, message: bytes) -> int | None:
        """The sequence number of `message` if it is a batch of this layout, else None."""
        at = self.sequence_at
        if (
            len(message) != self.size
            or not message.startswith(self.before)
            or not message.startswith(self.after, at + SEQUENCE_BYTES)
        ):
            return None
        value = 0
        for index in range(SEQUENCE_BYTES):
            byte = message[at + index]
            # A padded varint: a continuation bit on every byte but the last.
            if bool(byte & 0x80) != (index < SEQUENCE_BYTES - 1):
                return None
            value |= (byte & 0x7F) << (7 * index)
        return value & SEQUENCE_MASK

    def block(self, message: bytes) -> SampleBlock:
        """The batch's samples, copied out of `message` (one copy per tensor)."""
        view = memoryview(message)
        return SampleBlock(
            {s.name: copy_bytes(view[s.begin : s.end], s.dtype, s.shape) for s in self.slots},
            self.count,
        )


def learn(message: bytes, batch: Received, schema: BatchSchema, max_samples: int) -> Known | None:
    """The layout of `message` (`batch` as parse_batch read it), checked whole against
    `schema`, if it is the one `batch_layout` lays out for it; None if it is not.

    Raises:
        MalformedBatchError: The payload is not a batch of the buffer's tensors.
        ResourceLimitError: It carries more than `max_samples` samples.
    """
    columns = decode_columns(batch.payload, schema, max_samples)  # the full check, once
    payload = batch.payload
    header = json.loads(bytes(payload[8 : 8 + int.from_bytes(payload[:8], "little")]))
    count = len(next(iter(columns.values())))
    tensors = []
    for name, info in header.items():  # the agent's order, which the layout follows
        if not isinstance(info, dict) or name not in columns:
            return None  # metadata: not a layout of the agent's
        sample_bytes = (info["data_offsets"][1] - info["data_offsets"][0]) // count
        tensors.append((name, info["dtype"], tuple(info["shape"][1:]), sample_bytes))
    layout = batch_layout(batch.buffer, batch.collector_id, tensors, count)
    at = layout.sequence_at
    head = layout.head[:at] + padded_varint(batch.sequence) + layout.head[at + SEQUENCE_BYTES :]
    if len(message) != layout.size or not message.startswith(head):
        return None
    slots = []
    for name, column in columns.items():
        begin = layout.offsets[name]
        nbytes = math.prod(column.shape) * column.element_size()
        slots.append(Slot(name, column.dtype, tuple(column.shape), begin, begin + nbytes))
    return Known(
        layout.size,
        head[:at],
        head[at + SEQUENCE_BYTES :],
        at,
        batch.buffer,
        batch.collector_id,
        count,
        layout.payload_bytes,
        tuple(slots),
    )
