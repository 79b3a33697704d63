"""The experience.v1 `Batch` messages a RemoteDataCollector sends: framed, and encoded by hand.

Protobuf's own `SerializeToString` would copy the payload once more after the batch's tensors
were stacked into it: on these machines that copy costs about what the gRPC stream itself does.
So the collector serializes the small fields with protobuf and appends the payload field (tag,
varint length, bytes) itself, joining the payload's pieces straight into the message. Fields
may come in any order on the wire; the trainer parses it as any other Batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.data.batch import Sample, batch_pieces
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


def frame(
    samples: Sequence[Sample],
    max_bytes: int | None,
    buffer: str,
    collector_id: str,
    next_sequence: Callable[[], int],
) -> list[Framed | Oversized]:
    """`samples` as batches of at most `max_bytes` payload bytes (None: one batch), halving
    until they fit; each batch numbered by `next_sequence`."""
    if not samples:
        return []
    payload = batch_pieces(samples)
    size = sum(len(piece) for piece in payload)
    if max_bytes is not None and size > max_bytes:
        if len(samples) == 1:
            return [Oversized(size, max_bytes)]
        half = len(samples) // 2
        return [
            *frame(samples[:half], max_bytes, buffer, collector_id, next_sequence),
            *frame(samples[half:], max_bytes, buffer, collector_id, next_sequence),
        ]
    sequence = next_sequence()
    return [Framed(sequence, len(samples), batch_message(buffer, sequence, collector_id, payload))]


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
