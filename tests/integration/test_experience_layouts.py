"""A stream of batches laid out as the agent lays them out (`batch_layout`), into a real trainer:
the trainer reads the batches that repeat a layout it checked without parsing them again
(trainer_service/experience/layouts.py); each is still stored bit-exact, a resend is still
acknowledged as a duplicate, and a batch that differs from the layout in anything but its
sequence number and data is still checked whole and refused when bad."""

from __future__ import annotations

import grpc
import pytest
import torch

from shared import protocol
from shared.data.persist import load_samples
from shared.data.remote.wire import batch_layout, padded_varint
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.errors import error_reason
from shared.weights.digest import byte_view
from tests.integration.conftest import Services
from tests.integration.test_experience import start_trainer

PER_BATCH = 4
TENSORS = [("x", "F32", (1,), 4), ("y", "F32", (1,), 4), ("id", "I64", (), 8)]
LAYOUT = batch_layout("steps", "agent-7", TENSORS, PER_BATCH)


def columns(first: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(first, first + PER_BATCH)
    x = (ids.to(torch.float32) / 3).reshape(PER_BATCH, 1)
    return {"x": x, "y": -x, "id": ids}


def laid_out(sequence: int, first: int, head: bytes = LAYOUT.head) -> bytes:
    """The message the agent sends for batch `sequence`, samples first .. first + PER_BATCH."""
    message = bytearray(LAYOUT.size)
    message[: len(head)] = head
    at = LAYOUT.sequence_at
    message[at : at + 10] = padded_varint(sequence)
    for name, column in columns(first).items():
        data = byte_view(column.contiguous())
        message[LAYOUT.offsets[name] : LAYOUT.offsets[name] + len(data)] = data
    return bytes(message)


def collect(address: str, messages: list[bytes]) -> tuple[list[pb.BatchAck], grpc.RpcError | None]:
    acks: list[pb.BatchAck] = []
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/experience.v1.Experience/Collect",
            request_serializer=None,
            response_deserializer=pb.BatchAck.FromString,
        )
        try:
            for ack in call(iter(messages), timeout=30):
                acks.append(ack)
        except grpc.RpcError as error:
            return acks, error
    return acks, None


def test_batches_that_repeat_a_layout_are_stored_bit_exact_and_resends_once(
    services: Services,
) -> None:
    trainer = start_trainer(services)
    # Batches 1-3, batch 2 again (a resend: stored once), then 4.
    sent = [laid_out(1, 0), laid_out(2, 4), laid_out(3, 8), laid_out(2, 4), laid_out(4, 12)]
    acks, error = collect(trainer.address, sent)
    assert error is None
    assert [(a.sequence, a.samples, a.duplicate) for a in acks] == [
        (1, 4, False),
        (2, 4, False),
        (3, 4, False),
        (2, 0, True),
        (4, 4, False),
    ]
    assert {a.payload_bytes for a in acks} == {LAYOUT.payload_bytes}
    assert trainer.steps().received == 16
    assert trainer.stop() == list(range(16))
    saved = load_samples(trainer.state / "checkpoint" / "data" / "steps" / "buffer.safetensors")
    for stored in saved:
        i = int(stored["id"])
        x = torch.tensor([i / 3], dtype=torch.float32)
        assert torch.equal(stored["x"], x) and torch.equal(stored["y"], -x)  # bit-exact


def header_with(old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and LAYOUT.head.count(old) == 1
    return LAYOUT.head.replace(old, new)


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (
            header_with(b'"x":{"dtype":"F32"', b'"x":{"dtype":"F16"'),
            "batch for buffer 'steps': tensor 'x' has dtype 'F16' but the buffer collects FP32",
        ),
        (
            header_with(b'"id":{"dtype":"I64","shape":[4]', b'"id":{"dtype":"I64","shape":[2]'),
            "batch for buffer 'steps': its tensors hold different sample counts (x 4, y 4, id 2)",
        ),
    ],
    ids=["dtype", "sample-count"],
)
def test_a_batch_that_differs_from_a_known_layout_in_its_header_is_refused_and_stores_nothing(
    services: Services, head: bytes, why: str
) -> None:
    trainer = start_trainer(services)
    sent = [laid_out(1, 0), laid_out(2, 4), laid_out(3, 100, head), laid_out(4, 8)]
    acks, error = collect(trainer.address, sent)
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_BATCH
    assert why in (error.details() or "")
    assert [(a.sequence, a.samples) for a in acks] == [(1, 4), (2, 4)]
    assert trainer.stop() == list(range(8))  # the good batches before it alone
