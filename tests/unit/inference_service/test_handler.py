"""One push handler for both transports: weightsync.v1 messages decoded in process, or decoded
at the relay and carried over a real push link, get the same answer and change the same."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from inference_service.served_model import ServedModel
from inference_service.syncplane import messages
from inference_service.syncplane.inbox import TICK_S
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import PushOutcome
from inference_service.syncplane.relay.frames import Answer
from inference_service.syncplane.relay.link import RelayLink
from inference_service.syncplane.relay.service_end import ServiceLink
from inference_service.syncplane.service import SyncPlane
from shared.app import ModelSpec, TensorSpec
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import Status, failure
from shared.weights import wire
from shared.weights.digest import state_digest
from shared.weights.writer import Payload

SPEC = ModelSpec(
    "m",
    lambda: None,
    (TensorSpec("x", "FP32", (-1, 3)),),  # type: ignore[arg-type,return-value]
    (TensorSpec("y", "FP32", (-1, 2)),),
)
Push = Callable[[Iterator[bytes]], Answer]


def answer(plane: SyncPlane, parts: Iterator[object]) -> Answer:
    """What a transport answers: the outcome, or the status of the one error table."""
    try:
        return plane.push.handle(parts)  # type: ignore[arg-type]
    except Exception as error:
        return failure(error, "test")


@pytest.fixture(params=["in process", "relayed"])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[SyncPlane, Push]]:
    """A served model's sync plane, and a push of raw messages to it over one transport."""
    torch.manual_seed(0)
    model = ServedModel(SPEC, nn.Linear(3, 2), lambda m, x: m(x), True, torch.device("cpu"))
    plane = SyncPlane({"m": model}, SyncLimits(drain_timeout_s=1))
    if request.param == "in process":
        yield plane, lambda raw: answer(plane, messages.parts(raw))
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "links"))
    listener.listen()

    def serve() -> None:
        link = ServiceLink(listener.accept()[0])
        for stream in link.pushes():
            stream.answer(answer(plane, stream.waiting(TICK_S)))
        link.close()

    threading.Thread(target=serve, daemon=True).start()
    link = RelayLink(str(tmp_path / "links"), slots=2, slot_bytes=256)
    yield plane, lambda raw: link.push(messages.parts(raw))
    link.close()
    listener.close()


def request(**kind: object) -> bytes:
    return pb.PushRequest(**kind).SerializeToString()  # type: ignore[arg-type]


def push_of(model: ServedModel, version: int) -> tuple[dict[str, torch.Tensor], list[bytes], int]:
    """Weights for `version`, the messages of their full push (10-byte data messages), and its
    payload's size."""
    state = {k: v + version for k, v in model.live.module.state_dict().items()}
    payload = Payload.of(list(state.items()))
    header = pb.PushHeader(
        model_name="m", version=version, writer_id="t", payload_bytes=payload.nbytes
    )
    data = [wire.encode_data([chunk]) for chunk in payload.chunks(10)]
    commit = request(commit=pb.PushCommit(digest=state_digest(state)))
    return state, [request(header=header), *data, commit], payload.nbytes


def refused(message: str) -> Status:
    return Status(grpc.StatusCode.INVALID_ARGUMENT, "malformed-push", message)


def cut_off(raw: list[bytes]) -> Iterator[bytes]:
    yield from raw
    raise grpc.RpcError()  # the sender went away


# (the messages of a push, given a good one's; the answer)
BAD: list[tuple[str, Callable[[list[bytes]], Iterator[bytes]], Answer]] = [
    (
        "empty message first",
        lambda good: iter([request(), *good]),
        refused("the first message of a push must be a header, not empty"),
    ),
    (
        "data first",
        lambda good: iter(good[1:]),
        refused("the first message of a push must be a header, not data"),
    ),
    (
        "an empty message inside",
        lambda good: iter([*good[:2], request(), *good[2:]]),
        refused("unexpected empty message inside a push"),
    ),
    (
        "garbage inside",
        lambda good: iter([*good[:2], b"\xff\xff\xff\xff", *good[2:]]),
        refused("a push message is not a valid weightsync.v1.PushRequest"),
    ),
    (
        "garbage after the commit",
        lambda good: iter([*good, b"\xff\xff\xff\xff"]),
        refused("messages follow the commit; it must come last"),
    ),
    (
        "cut off before the header",
        lambda good: cut_off([]),
        refused("the sender cancelled the push before its header"),
    ),
    (
        "cut off after 20 bytes",
        lambda good: cut_off(good[:3]),
        Status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "push-broken",
            "the sender cancelled the push after 20 payload bytes",
        ),
    ),
    (
        "version 0",
        lambda good: iter([request(header=pb.PushHeader(model_name="m")), *good[1:]]),
        refused("the push header's version must be at least 1"),
    ),
    (
        "epoch out of range",
        lambda good: iter(
            [request(header=pb.PushHeader(model_name="m", version=1, writer_epoch=1 << 63))]
        ),
        Status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "out-of-range",
            "the push header's writer_epoch 9223372036854775808 is out of range: it must be "
            "below 2^63",
        ),
    ),
]


@pytest.mark.parametrize(("make", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_push_gets_the_same_answer_and_changes_nothing(
    transport: tuple[SyncPlane, Push],
    make: Callable[[list[bytes]], Iterator[bytes]],
    expected: Answer,
) -> None:
    plane, push = transport
    model = plane.model("m")
    before = model.live
    _, good, _ = push_of(model, 1)
    assert push(make(good)) == expected
    assert model.live is before and model.live.version == 0
    state, good, size = push_of(model, 1)  # and a good push after it commits bit-exact
    outcome = push(iter(good))
    assert isinstance(outcome, PushOutcome) and 0 < outcome.finish_s < 60
    assert dataclasses.replace(outcome, finish_s=0.0) == PushOutcome(
        "m", 1, state_digest(state), size
    )
    live = model.live.module.state_dict()
    assert all(torch.equal(live[name], tensor) for name, tensor in state.items())
