"""A review of the experience plane from its documentation and proto alone: Batch messages
built byte by byte from the wire format (protobuf fields, safetensors payloads) and streamed to
a real trainer over gRPC. A batch the trainer acknowledges is stored (once); one it cannot take
is refused with a status naming the problem and stores nothing."""

from __future__ import annotations

import json
import socket
import struct
import time

import grpc
import torch

from shared import protocol
from shared.data.persist import load_samples
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.errors import error_reason
from tests.integration.conftest import Services
from tests.integration.test_experience import Trainer, start_trainer


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def delimited(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


def payload(first: int, count: int) -> bytes:
    """A safetensors file of `count` samples of the `steps` buffer, ids from `first`, written
    by hand: an 8-byte little-endian header length, the JSON header, the tensors' bytes."""
    ids = torch.arange(first, first + count, dtype=torch.int64)
    x = (ids.to(torch.float32) / 3).reshape(count, 1)
    data = [("x", "F32", [count, 1], x), ("y", "F32", [count, 1], -x), ("id", "I64", [count], ids)]
    header, body, at = {}, b"", 0
    for name, dtype, shape, tensor in data:
        raw = tensor.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        body, at = body + raw, at + len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def batch(sequence: int, body: bytes, collector: str = "", buffer: str = "steps") -> bytes:
    message = delimited(1, buffer.encode()) + tag(2, 0) + varint(sequence) + delimited(3, body)
    return message + (delimited(4, collector.encode()) if collector else b"")


def collect(
    trainer: Trainer, messages: list[bytes]
) -> tuple[list[tuple[int, int, bool]], grpc.RpcError | None]:
    """Stream the messages as they are on one Collect call: the acks, and the call's error."""
    acks: list[tuple[int, int, bool]] = []
    with grpc.insecure_channel(trainer.address) as channel:
        call = channel.stream_stream(
            "/experience.v1.Experience/Collect",
            request_serializer=None,
            response_deserializer=pb.BatchAck.FromString,
        )
        try:
            for ack in call(iter(messages), timeout=30):
                acks.append((ack.sequence, ack.samples, ack.duplicate))
        except grpc.RpcError as error:
            return acks, error
    return acks, None


def test_a_batch_whose_sequence_was_never_stored_is_stored_not_acknowledged_as_a_resend(
    services: Services,
) -> None:
    """A sender whose numbers skip (1, 3) and later sends the one skipped (2) on a new call,
    lower than its highest: that batch was never stored, so it is no resend: it is stored and
    acknowledged as such, never acknowledged as a duplicate and lost; 3 sent again is."""
    trainer = start_trainer(services)
    acks, error = collect(trainer, [batch(1, payload(0, 2), "A"), batch(3, payload(2, 2), "A")])
    assert error is None and acks == [(1, 2, False), (3, 2, False)]
    acks, error = collect(trainer, [batch(2, payload(4, 2), "A"), batch(3, payload(2, 2), "A")])
    assert error is None and acks == [(2, 2, False), (3, 0, True)]
    assert trainer.stop() == [0, 1, 2, 3, 4, 5]


# A field the Batch defines sent with a fixed-width wire type (fixed64: 1, fixed32: 5).
WRONG_WIRE_TYPES = [
    (
        delimited(1, b"steps") + tag(2, 1) + struct.pack("<Q", 7) + delimited(3, payload(0, 1)),
        "a Batch message's sequence is not a varint",
    ),
    (
        delimited(1, b"steps") + tag(2, 5) + struct.pack("<I", 7) + delimited(3, payload(0, 1)),
        "a Batch message's sequence is not a varint",
    ),
    (
        batch(1, payload(0, 1)) + tag(4, 5) + b"abcd",
        "a Batch message's collector_id is not length-delimited",
    ),
    (
        tag(1, 1) + b"steps..." + tag(2, 0) + varint(1) + delimited(3, payload(0, 1)),
        "a Batch message's buffer is not length-delimited",
    ),
    (
        delimited(1, b"steps") + tag(2, 0) + varint(1) + tag(3, 1) + b"payload!",
        "a Batch message's payload is not length-delimited",
    ),
]


def test_a_known_field_of_a_fixed_width_wire_type_is_refused_naming_the_field(
    services: Services,
) -> None:
    """A field the Batch defines, sent with a fixed-width wire type instead of its own, is
    refused as one sent as a varint or length-delimited already is: never read as absent (a
    sequence read as 0 on every batch made each a resend of the first, acknowledged and
    dropped)."""
    trainer = start_trainer(services)
    for sequence, (message, why) in enumerate(WRONG_WIRE_TYPES):
        acks, error = collect(trainer, [batch(1, payload(2 * sequence, 2)), message])
        assert error is not None
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error_reason(error) == protocol.MALFORMED_BATCH
        assert why in (error.details() or "")
        assert acks == [(1, 2, False)]
    assert trainer.stop() == list(range(2 * len(WRONG_WIRE_TYPES)))


def safetensors(header: object, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8 if pad else 0)
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list[object], offsets: list[object]) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def two(**replace: object) -> bytes:
    """A payload of two samples (32 data bytes), its header's entries replaced as given."""
    header: dict[str, object] = {
        "x": entry("F32", [2, 1], [0, 8]),
        "y": entry("F32", [2, 1], [8, 16]),
        "id": entry("I64", [2], [16, 32]),
    }
    header.update(replace)
    return safetensors(header, bytes(32))


LYING_HEADERS = [
    (two(x=entry("F32", [2.0, 1], [0, 8])), "tensor 'x': shape [2.0, 1] is not a list of sizes"),
    (two(x=entry("F32", [True, 1], [0, 8])), "tensor 'x': shape [True, 1] is not a list of sizes"),
    (two(x=entry("F32", [2, 1], [0, 8.0])), "tensor 'x': data_offsets [0, 8.0] is not [begin"),
    (two(x=entry("F32", [2, 1], [8, 0])), "tensor 'x': data_offsets [8, 0] is not [begin, end)"),
    (two(y=entry("F32", [2, 1], [0, 8])), "tensor 'y': data_offsets [0, 8) overlaps"),
    (two(id=entry("I64", [2], [24, 40])), "tensor 'id': data_offsets [24, 40) leaves a gap"),
    (two(x={"dtype": "F32", "shape": [2, 1]}), "a header entry has exactly dtype, shape and"),
    (two(x=5), "a header entry has exactly dtype, shape and data_offsets"),
    (safetensors([1, 2], b""), "the safetensors header must be a JSON object"),
    (struct.pack("<Q", 1 << 63) + b"{}", "the safetensors header length 9223372036854775808"),
    (two() + bytes(8), "the header describes 32 data bytes but the payload carries 40"),
    (
        safetensors(
            {
                "x": entry("F32", [0, 1], [0, 0]),
                "y": entry("F32", [0, 1], [0, 0]),
                "id": entry("I64", [0], [0, 0]),
            },
            b"",
        ),
        "it carries no samples; send at least one",
    ),
    (  # 2**62 samples: 2**64 bytes of each tensor, 0 once wrapped to 64 bits
        safetensors(
            {
                "x": entry("F32", [1 << 62, 1], [0, 0]),
                "y": entry("F32", [1 << 62, 1], [0, 0]),
                "id": entry("I64", [1 << 62], [0, 0]),
            },
            b"",
        ),
        "tensor 'x': shape [4611686018427387904, 1] is not a list of sizes",
    ),
]


def test_a_safetensors_header_that_lies_is_refused_naming_the_problem_and_stores_nothing(
    services: Services,
) -> None:
    """Shapes and offsets of the wrong JSON type, offsets that run backwards, overlap or leave
    a gap, entries that are not tensors, lengths and sizes that wrap: each refused with
    INVALID_ARGUMENT naming it, the good batch before it alone stored."""
    trainer = start_trainer(services)
    for index, (body, why) in enumerate(LYING_HEADERS):
        acks, error = collect(trainer, [batch(1, payload(2 * index, 2)), batch(2, body)])
        assert error is not None, why
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error_reason(error) == protocol.MALFORMED_BATCH
        assert why in (error.details() or "")
        assert acks == [(1, 2, False)]
    assert trainer.stop() == list(range(2 * len(LYING_HEADERS)))


def test_a_batch_laid_out_unlike_the_agents_is_stored_bit_exact(services: Services) -> None:
    """What the formats allow and the agent never sends: tensors' data in another order than
    the header's, a header not padded to 8 bytes (the data unaligned), the Batch's fields in
    reverse order and an unknown field after them. Each is stored, the values bit-exact."""
    ids = torch.arange(4, dtype=torch.int64)
    x = (ids.to(torch.float32) / 3).reshape(4, 1)
    raw = {"x": x.numpy().tobytes(), "y": (-x).numpy().tobytes(), "id": ids.numpy().tobytes()}
    backwards = safetensors(  # the data: id, then y, then x
        {
            "x": entry("F32", [4, 1], [48, 64]),
            "y": entry("F32", [4, 1], [32, 48]),
            "id": entry("I64", [4], [0, 32]),
        },
        raw["id"] + raw["y"] + raw["x"],
    )
    unpadded = safetensors(
        {
            "id": entry("I64", [4], [0, 32]),
            "x": entry("F32", [4, 1], [32, 48]),
            "y": entry("F32", [4, 1], [48, 64]),
        },
        raw["id"] + raw["x"] + raw["y"],
        pad=False,
    )
    shuffled = delimited(3, payload(4, 4)) + tag(2, 0) + varint(3) + delimited(1, b"steps")
    shuffled += tag(15, 0) + varint(99) + delimited(16, b"from a newer proto")
    trainer = start_trainer(services)
    acks, error = collect(trainer, [batch(1, backwards), batch(2, unpadded), shuffled])
    assert error is None
    assert acks == [(1, 4, False), (2, 4, False), (3, 4, False)]
    assert trainer.stop() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    saved = load_samples(trainer.state / "checkpoint" / "data" / "steps" / "buffer.safetensors")
    for stored in saved:
        value = torch.tensor([int(stored["id"]) / 3], dtype=torch.float32)
        assert torch.equal(stored["x"], value) and torch.equal(stored["y"], -value)


def h2_frame(kind: int, flags: int, stream: int, data: bytes) -> bytes:
    return len(data).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + data


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing (names and values under 127)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def stall_half_way(address: str, message: bytes) -> socket.socket:
    """Open a Collect call over HTTP/2 by hand and send half of one message (its gRPC prefix
    announces all of it), then nothing more; the connection stays open."""
    host, port = address.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=30)
    headers = b"".join(
        hpack_literal(name, value)
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/experience.v1.Experience/Collect"),
            (b":authority", address.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    )
    half = message[: len(message) // 2]
    connection.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + h2_frame(4, 0, 0, b"")  # SETTINGS
        + h2_frame(1, 4, 1, headers)  # HEADERS, END_HEADERS
        + h2_frame(0, 0, 1, b"\x00" + len(message).to_bytes(4, "big") + half)  # DATA
    )
    return connection


def test_a_call_stalled_half_way_through_a_message_is_ended_and_frees_its_slot(
    services: Services,
) -> None:
    """An agent that announces a batch, sends half of it and hangs holds its call slot only
    until the idle timeout; then other agents are let in, and nothing of the half is stored."""
    trainer = start_trainer(
        services, "--experience-streams", "1", "--experience-idle-timeout-s", "2"
    )
    stalled = stall_half_way(trainer.address, batch(1, payload(100, 2)))
    try:
        attempts = 0
        while True:  # refused while the stalled call holds the only slot, then let in
            attempts += 1
            acks, error = collect(trainer, [batch(1, payload(0, 2))])
            if error is None:
                break
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert attempts < 120
            time.sleep(0.5)
        assert acks == [(1, 2, False)]
    finally:
        stalled.close()
    assert trainer.stop() == [0, 1]
