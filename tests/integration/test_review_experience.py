"""Collect messages a hostile or broken agent may send, read by hand by a real trainer: each is
refused with INVALID_ARGUMENT naming what is wrong with it, and nothing of it is stored."""

from __future__ import annotations

import grpc
import pytest

from shared import protocol
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.errors import error_reason
from tests.integration.conftest import Services
from tests.integration.test_experience import good, start_trainer


@pytest.mark.parametrize(
    ("message", "why"),
    [
        # `buffer` (field 1) sent as a varint: named as the field it is, not as the payload.
        (b"\x08\x05", "a Batch message's buffer is not length-delimited"),
        (b"\x20\x05", "a Batch message's collector_id is not length-delimited"),
        # A payload whose length (2**63 - 1) runs far past the message.
        (b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x00", "a Batch message's field runs past"),
        # A whole batch cut short: its payload ends 9 bytes early.
        (
            pb.Batch(buffer="steps", sequence=2, payload=good(2, 2)).SerializeToString()[:-9],
            "a Batch message's field runs past its end",
        ),
    ],
    ids=["buffer-as-varint", "collector-as-varint", "payload-length-lies", "batch-cut-short"],
)
def test_a_batch_with_a_lying_field_is_refused_naming_the_field_and_stores_nothing(
    services: Services, message: bytes, why: str
) -> None:
    trainer = start_trainer(services)
    with grpc.insecure_channel(trainer.address) as channel:
        collect = channel.stream_stream(
            "/experience.v1.Experience/Collect",
            request_serializer=None,
            response_deserializer=pb.BatchAck.FromString,
        )
        first = pb.Batch(buffer="steps", sequence=1, payload=good(0, 2)).SerializeToString()
        acks = []
        with pytest.raises(grpc.RpcError) as refused:
            for ack in collect(iter([first, message]), timeout=30):
                acks.append(ack)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_BATCH
    assert why in (error.details() or "")
    assert [(a.sequence, a.samples) for a in acks] == [(1, 2)]
    assert trainer.stop() == [0, 1]  # the good batch before it alone
