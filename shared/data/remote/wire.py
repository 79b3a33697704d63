"""The experience.v1 `Batch` messages a RemoteDataCollector sends: framed, and encoded by hand.

Protobuf's own `SerializeToString` would copy the payload once more after the batch's tensors
were stacked into it: on these machines that copy costs about what the gRPC stream itself does.
So the collector serializes the small fields with protobuf and appends the payload field (tag,
varint length, bytes) itself, joining the payload's pieces (the header and views of the slab the
samples were collected into, already stacked) straight into the message: the one copy between
`collect()` and the socket. Fields
may come in any order on the wire; the trainer parses it as any other Batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.data.batch import column_pieces
from shared.errors import MalformedBatchError
from shared.gen.experience.v1 import experience_pb2 as pb

PAYLOAD_TAG = b"\x1a"  # field 3 (`payload`), wire type 2 (length-delimited)


@dataclass(eq=False)  # batches are told apart by identity
class Framed:
    """A batch ready to send (and to send again until acknowledged)."""

    sequence: int
    samples: int
    message: bytes  # the serialized Batch
    sent_at: float | None = None


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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
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

    Fields may come in any order and repeat (the last wins); unknown ones are skipped.

    Raises:
        MalformedBatchError: The message is not a protobuf encoding of a Batch.
    """
    view = memoryview(message)
    fields: dict[int, int | memoryview] = {}
    at, end = 0, len(view)
    while at < end:
        key, at = _read_varint(view, at)
        number, kind = key >> 3, key & 7
        value: int | memoryview
        if kind == 0:
            value, at = _read_varint(view, at)
        elif kind == 2:
            size, at = _read_varint(view, at)
            if at + size > end:
                raise MalformedBatchError("a Batch message's field runs past its end")
            value, at = view[at : at + size], at + size
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
            continue
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


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(at, min(at + 10, len(view))):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, index + 1
    raise MalformedBatchError("a Batch message holds a truncated or overlong varint")


def _bytes(value: int | memoryview | None, field: str) -> memoryview:
    if isinstance(value, int):
        raise MalformedBatchError(f"a Batch message's {field} is not length-delimited")
    return memoryview(b"") if value is None else value


def _text(value: int | memoryview | None, field: str) -> str:
    try:
        return bytes(_bytes(value, field)).decode()
    except UnicodeDecodeError:
        raise MalformedBatchError(f"a Batch message's {field} is not UTF-8") from None


def _number(value: int | memoryview | None) -> int:
    if isinstance(value, memoryview):
        raise MalformedBatchError("a Batch message's sequence is not a varint")
    return 0 if value is None else value & ((1 << 64) - 1)
