"""The hand-written PushRequest data encoding is byte-for-byte protobuf's."""

from __future__ import annotations

import pytest

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights import wire
from shared.weights.wire import data_payload, encode_data


def decode(message: bytes | memoryview) -> pb.PushRequest | memoryview:
    """A data message's payload as a view of `message`, or any other message parsed (as a
    receiver reads them)."""
    payload = data_payload(message)
    return payload if payload is not None else pb.PushRequest.FromString(message)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, (1 << 20) + 3])
def test_encoding_matches_protobuf(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pieces = [memoryview(payload)[: size // 3], payload[size // 3 :]]
    encoded = encode_data(pieces)
    assert encoded == pb.PushRequest(data=payload).SerializeToString()
    decoded = decode(encoded)
    if size == 0:  # protobuf writes nothing for empty bytes
        assert isinstance(decoded, memoryview) or decoded.data == b""
    else:
        assert isinstance(decoded, memoryview) and bytes(decoded) == payload


def test_other_messages_go_through_protobuf() -> None:
    header = pb.PushRequest(header=pb.PushHeader(model_name="m", version=3))
    decoded = decode(header.SerializeToString())
    assert isinstance(decoded, pb.PushRequest) and decoded.header.version == 3
    commit = pb.PushRequest(commit=pb.PushCommit(digest=b"\x12" * 16))
    assert decode(commit.SerializeToString()) == commit


def test_a_data_field_followed_by_more_fields_is_parsed_by_protobuf() -> None:
    # protobuf semantics: the last oneof member wins; the fast path must not claim this one
    message = (
        encode_data([b"abc"]) + pb.PushRequest(header=pb.PushHeader(version=9)).SerializeToString()
    )
    decoded = decode(message)
    assert isinstance(decoded, pb.PushRequest) and decoded.WhichOneof("kind") == "header"


def test_a_payload_passed_on_is_sent_in_the_message_it_came_in() -> None:
    message = wire.encode_data([bytes(range(256)) * 64])
    payload = wire.data_payload(message)
    assert payload is not None
    assert wire.data_message(payload) is message  # no copy
    # Anything else is encoded: other views of that message, other bytes.
    for other in (payload[1:], payload[:-1], payload[:0], memoryview(bytes(payload))):
        encoded = wire.data_message(other)
        assert encoded is not message
        assert pb.PushRequest.FromString(encoded).data == bytes(other)
    assert wire.data_message(bytes(payload)) == message
