"""The experience.v1 `Batch` messages a RemoteDataCollector sends: encoded by hand.

A batch of `batch_size` samples is collected straight into its message (`Layout`, pending.py):
the message's Batch fields, its payload's safetensors header and, for each tensor, room for its
samples stacked, laid out once per sample layout, so `collect()`'s copy of a sample into its rows
is the only copy between the agent's tensors and gRPC (which copies each message it sends, as it
does any other). The sequence number, known only when the batch leaves, is a varint padded to
ten bytes (protobuf reads a varint with redundant continuation bytes as its value) written in
place; the header is padded with spaces so each tensor's data starts 8-byte aligned.

A batch of fewer samples (one `max_delay_s` sent early, or split to the trainer's limit) is
joined from views of its rows into a message of its own (`frame`): one more copy, for batches
that are not full. Protobuf's own `SerializeToString` would copy the payload yet again. Fields
may come in any order on the wire; the trainer parses every Batch by hand (`parse_batch`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shared.data.batch import column_pieces
from shared.errors import MalformedBatchError
from shared.gen.experience.v1 import experience_pb2 as pb

if TYPE_CHECKING:
    from shared.data.remote.pending import Slab

PAYLOAD_TAG = b"\x1a"  # field 3 (`payload`), wire type 2 (length-delimited)
SEQUENCE_TAG = b"\x10"  # field 2 (`sequence`), wire type 0 (varint)
SEQUENCE_BYTES = 10  # the longest varint: room for any sequence number


@dataclass(eq=False)  # batches are told apart by identity
class Framed:
    """A batch ready to send (and to send again until acknowledged)."""

    sequence: int
    samples: int
    message: bytes  # the serialized Batch
    sent_at: float | None = None
    slab: Slab | None = None  # the slab whose memory `message` is, to fill again once acknowledged


@dataclass(frozen=True)
class Layout:
    """Where everything lies in the message of a batch of `capacity` samples, collected in
    place: `head` (its Batch fields and the payload's safetensors header) at 0, the sequence
    number's ten bytes at `sequence_at`, and each tensor's samples, stacked, at `offsets`."""

    size: int
    head: bytes
    sequence_at: int
    offsets: dict[str, int]
    payload_bytes: int


def batch_layout(
    buffer: str,
    collector_id: str,
    tensors: Sequence[tuple[str, str, tuple[int, ...], int]],
    capacity: int,
) -> Layout:
    """The message of a batch of `capacity` samples of `tensors` (each: name, safetensors dtype,
    shape of one sample, bytes of one sample), in that order."""
    fields = pb.Batch(buffer=buffer, collector_id=collector_id).SerializeToString()
    fields += SEQUENCE_TAG
    sequence_at = len(fields)
    fields += padded_varint(0)
    table: dict[str, object] = {}
    offsets: dict[str, int] = {}
    data = 0
    for name, dtype, shape, nbytes in tensors:
        end = data + capacity * nbytes
        table[name] = {"dtype": dtype, "shape": [capacity, *shape], "data_offsets": [data, end]}
        offsets[name] = data
        data = end
    body = json.dumps(table, separators=(",", ":")).encode()
    # The payload's length varint takes the size the longest padding would need (padded out
    # when shorter), so the padding below does not move what follows it.
    width = len(_varint(8 + len(body) + 7 + data))
    start = len(fields) + len(PAYLOAD_TAG) + width + 8 + len(body)
    body += b" " * (-start % 8)  # each tensor's data 8-byte aligned within the message
    start += -start % 8
    payload_bytes = 8 + len(body) + data
    header = (
        fields
        + PAYLOAD_TAG
        + _varint(payload_bytes, width)
        + len(body).to_bytes(8, "little")
        + body
    )
    assert len(header) == start
    return Layout(
        start + data, header, sequence_at, {n: start + o for n, o in offsets.items()}, payload_bytes
    )


def padded_varint(value: int) -> bytes:
    """`value` as a varint of exactly SEQUENCE_BYTES bytes."""
    return _varint(value, SEQUENCE_BYTES)


@dataclass(frozen=True)
class Oversized:
    """A sample that alone is over the trainer's limit on batches: it can never be sent."""

    size: int
    max_bytes: int

    def __str__(self) -> str:
        return (
            f"a sample takes {self.size} bytes; the trainer takes batches of at most "
            f"{self.max_bytes}"
        )


def frame(
    columns: Mapping[str, torch.Tensor],
    count: int,
    max_bytes: int | None,
    buffer: str,
    collector_id: str,
    next_sequence: Callable[[], int],
) -> list[Framed | Oversized]:
    """`count` samples, given stacked (`columns`: each tensor's samples along the first
    dimension, views of the collector's slab), as batches of at most `max_bytes` payload bytes
    (None: one batch), halving until they fit; each batch numbered by `next_sequence`."""
    if not count:
        return []
    payload = column_pieces(columns)
    size = sum(len(piece) for piece in payload)
    if max_bytes is not None and size > max_bytes:
        if count == 1:
            return [Oversized(size, max_bytes)]
        half = count // 2
        first = {name: column[:half] for name, column in columns.items()}
        rest = {name: column[half:] for name, column in columns.items()}
        return [
            *frame(first, half, max_bytes, buffer, collector_id, next_sequence),
            *frame(rest, count - half, max_bytes, buffer, collector_id, next_sequence),
        ]
    sequence = next_sequence()
    return [Framed(sequence, count, batch_message(buffer, sequence, collector_id, payload))]


def batch_message(
    buffer: str, sequence: int, collector_id: str, payload: Sequence[bytes | memoryview]
) -> bytes:
    """The serialized `Batch{buffer, sequence, collector_id, payload: concat(payload)}`."""
    head = pb.Batch(buffer=buffer, sequence=sequence, collector_id=collector_id)
    size = sum(len(piece) for piece in payload)
    return b"".join([head.SerializeToString(), PAYLOAD_TAG, _varint(size), *payload])


def _varint(value: int, width: int = 0) -> bytes:
    """`value` as a varint, padded with redundant continuation bytes to `width` bytes."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value and len(out) + 1 >= width:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


@dataclass(frozen=True)
class Received:
    """A Batch as the trainer reads it: its payload a view of the message, not a copy."""

    buffer: str
    sequence: int
    collector_id: str
    payload: memoryview


def parse_batch(message: bytes) -> Received:
    """Read a serialized Batch by hand (protobuf's parse would copy the payload).

    Fields may come in any order and repeat (the last wins); unknown ones are skipped. A field
    of the Batch's sent with another wire type than its own is refused, whatever that type (read
    as absent, a sequence sent as fixed64 would number every batch 0: each after the first a
    resend of it, acknowledged and dropped).

    Raises:
        MalformedBatchError: The message is not a protobuf encoding of a Batch.
    """
    view = memoryview(message)
    fields: dict[int, int | memoryview | _Fixed] = {}
    at, end = 0, len(view)
    while at < end:
        key, at = _read_varint(view, at)
        number, kind = key >> 3, key & 7
        value: int | memoryview | _Fixed
        if kind == 0:
            value, at = _read_varint(view, at)
        elif kind == 2:
            size, at = _read_varint(view, at)
            if at + size > end:
                raise MalformedBatchError("a Batch message's field runs past its end")
            value, at = view[at : at + size], at + size
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
            if number not in _FIELDS:
                continue
            value = _FIXED
        else:
            raise MalformedBatchError(f"a Batch message holds a field of wire type {kind}")
        fields[number] = value
    if at != end:
        raise MalformedBatchError("a Batch message's last field runs past its end")
    return Received(
        _text(fields.get(1), "buffer"),
        _number(fields.get(2)),
        _text(fields.get(4), "collector_id"),
        _bytes(fields.get(3), "payload"),
    )


class _Fixed:
    """A fixed-width (fixed32 or fixed64) value: the wire type of none of the Batch's fields."""


_FIXED = _Fixed()
_FIELDS = frozenset({1, 2, 3, 4})  # buffer, sequence, payload, collector_id


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(at, min(at + 10, len(view))):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index + 1
    raise MalformedBatchError("a Batch message holds a truncated or overlong varint")


def _bytes(value: int | memoryview | _Fixed | None, field: str) -> memoryview:
    if not isinstance(value, memoryview | None):
        raise MalformedBatchError(f"a Batch message's {field} is not length-delimited")
    return memoryview(b"") if value is None else value


def _text(value: int | memoryview | _Fixed | None, field: str) -> str:
    try:
        return bytes(_bytes(value, field)).decode()
    except UnicodeDecodeError:
        raise MalformedBatchError(f"a Batch message's {field} is not UTF-8") from None


def _number(value: int | memoryview | _Fixed | None) -> int:
    if not isinstance(value, int | None):
        raise MalformedBatchError("a Batch message's sequence is not a varint")
    return 0 if value is None else value & ((1 << 64) - 1)
