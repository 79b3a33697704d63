"""Resumable pushes: a push whose stream breaks before its commit keeps its partial state for
the resume window, and a push from the same writer naming `resume_from` continues it (or takes
over one still in flight whose sender went quiet); anything else is refused with
FAILED_PRECONDITION, `resume-mismatch`, and nothing is applied."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import error_reason
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.test_forwarding import STAMP, served_version, stamp_state

CHUNK = 64 << 10
BROKEN_AT = 5 * CHUNK  # payload bytes a broken push applied


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


def payload_of(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(bytes(p) for pieces in Payload.of(list(state.items())).pieces() for p in pieces)


def header(payload: bytes, version: int, epoch: int, **fields: object) -> pb.PushRequest:
    named = {
        "model_name": "stamp",
        "version": version,
        "writer_id": "tester",
        "payload_bytes": len(payload),
        "writer_epoch": epoch,
        **fields,
    }
    return pb.PushRequest(header=pb.PushHeader(**named))  # type: ignore[arg-type]


def data(payload: bytes, start: int, stop: int) -> list[pb.PushRequest]:
    return [
        pb.PushRequest(data=payload[at : min(at + CHUNK, stop)]) for at in range(start, stop, CHUNK)
    ]


def commit(state: dict[str, torch.Tensor]) -> pb.PushRequest:
    return pb.PushRequest(commit=pb.PushCommit(digest=state_digest(state)))


class Held:
    """A push stream that sends `first`, then waits until released: then `then`, or it is
    cancelled."""

    def __init__(self, replica: Inference, first: list[pb.PushRequest]) -> None:
        self.then: list[pb.PushRequest] = []
        self._released = threading.Event()
        self._first = first
        self.call = replica.sync_stub().Push.future(self._messages(), timeout=60)

    def _messages(self) -> Iterator[pb.PushRequest]:
        yield from self._first
        self._released.wait(60)
        yield from self.then

    def release(self, then: list[pb.PushRequest]) -> None:
        self.then = then
        self._released.set()


def broken(
    services: Services, replica: Inference, payload: bytes, version: int, epoch: int
) -> None:
    """A push of `payload` whose sender goes away after BROKEN_AT payload bytes; returns once
    the replica kept it."""
    held = Held(replica, [header(payload, version, epoch), *data(payload, 0, BROKEN_AT)])
    wait_until(lambda: replica.model_state("stamp").pending.bytes_received == BROKEN_AT, 30)
    held.call.cancel()
    kept = f"broke off after {BROKEN_AT} payload bytes; kept"
    wait_until(lambda: kept in services.log("inference"), 30)
    held.release([])  # only now: the cancelled stream is not ended cleanly before


def push(replica: Inference, messages: list[pb.PushRequest]) -> pb.PushResponse:
    response: pb.PushResponse = replica.sync_stub().Push(iter(messages), timeout=30)
    return response


def refusal(replica: Inference, messages: list[pb.PushRequest]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as refused:
        push(replica, messages)
    error = refused.value
    return error.code(), error_reason(error) or "", error.details() or ""


def acquire(replica: Inference, writer: str = "tester") -> int:
    request = pb.AcquireWriterRequest(model_name="stamp", writer_id=writer)
    return int(replica.sync_stub().AcquireWriter(request, timeout=10).epoch)


def serves(replica: Inference, version: int, state: dict[str, torch.Tensor]) -> bool:
    now = replica.model_state("stamp")
    return (now.version, now.digest) == (version, state_digest(state))


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_push_broken_mid_stream_is_resumed_from_the_bytes_applied_and_commits_bit_exact(
    services: Services, relay: str
) -> None:
    replica = services.inference(STAMP, "--sync-relay", relay)
    epoch = acquire(replica)
    state = stamp_state(4)
    payload = payload_of(state)
    before = replica.model_state("stamp")
    broken(services, replica, payload, 2, epoch)
    now = replica.model_state("stamp")  # kept: `pending` names the offset to resume from
    assert (now.pending.version, now.pending.bytes_received) == (2, BROKEN_AT)
    assert (now.version, now.digest) == (before.version, before.digest)

    # From a little before the bytes applied (a stale offset): the overlap is skipped.
    start = BROKEN_AT - 1000
    resumed = [header(payload, 2, epoch, resume_from=start)]
    response = push(replica, [*resumed, *data(payload, start, len(payload)), commit(state)])

    assert response.version == 2
    assert serves(replica, 2, state)
    assert served_version(replica) == "2"
    resumed_at = f"resumed from byte {start} ({BROKEN_AT} applied; the push was suspended)"
    assert resumed_at in services.log("inference")


def test_a_resume_naming_another_push_or_an_offset_past_the_bytes_applied_is_refused(
    services: Services,
) -> None:
    replica = services.inference(STAMP)
    epoch = acquire(replica)
    state = stamp_state(5)
    payload = payload_of(state)
    broken(services, replica, payload, 2, epoch)
    before = replica.model_state("stamp")
    rest = [*data(payload, BROKEN_AT, len(payload)), commit(state)]

    cases = {
        "another version": header(payload, 3, epoch, resume_from=BROKEN_AT),
        "another writer": header(payload, 2, epoch, resume_from=BROKEN_AT, writer_id="other"),
        "another size": header(payload[:-8], 2, epoch, resume_from=BROKEN_AT),
        "past the bytes applied": header(payload, 2, epoch, resume_from=BROKEN_AT + 1),
    }
    for case, resume in cases.items():
        code, reason, message = refusal(replica, [resume, *rest])
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, protocol.RESUME_MISMATCH)
        assert "nothing was applied" in message, (case, message)
        now = replica.model_state("stamp")
        assert (now.version, now.digest) == (before.version, before.digest), case
        assert now.pending.bytes_received == BROKEN_AT, case  # the kept push is intact
    code, _, message = refusal(replica, [cases["another writer"], *rest])
    assert "writer_id 'tester'/'other'" in message
    code, _, message = refusal(replica, [cases["past the bytes applied"], *rest])
    assert f"{BROKEN_AT} payload bytes applied; resume_from {BROKEN_AT + 1} is past" in message

    # A fenced epoch: refused exactly as any push under it.
    acquire(replica, "another")
    resume = header(payload, 2, epoch, resume_from=BROKEN_AT)
    code, reason, message = refusal(replica, [resume, *rest])
    assert (code, reason) == (grpc.StatusCode.ABORTED, protocol.FENCED)
    assert "is fenced" in message
    now = replica.model_state("stamp")
    assert (now.version, now.digest) == (before.version, before.digest)


def test_a_resume_after_the_window_is_refused_and_a_whole_push_commits(
    services: Services,
) -> None:
    replica = services.inference(STAMP, "--push-resume-window-s", "0.5")
    epoch = acquire(replica)
    state = stamp_state(6)
    payload = payload_of(state)
    before = replica.model_state("stamp")
    broken(services, replica, payload, 2, epoch)
    # The window passed: the kept push was dropped as a failed push is.
    wait_until(lambda: not replica.model_state("stamp").HasField("pending"), 10)

    resume = header(payload, 2, epoch, resume_from=BROKEN_AT)
    code, reason, message = refusal(
        replica, [resume, *data(payload, BROKEN_AT, len(payload)), commit(state)]
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, protocol.RESUME_MISMATCH)
    assert "no push of version 2 from 'tester' is kept here to resume" in message
    now = replica.model_state("stamp")
    assert (now.version, now.digest) == (before.version, before.digest)

    whole = [header(payload, 2, epoch), *data(payload, 0, len(payload)), commit(state)]
    assert push(replica, whole).version == 2
    assert serves(replica, 2, state)


def test_a_resume_takes_over_a_push_in_flight_whose_sender_went_quiet(
    services: Services,
) -> None:
    # The quiet sender is not ended by the idle timeout before the resume arrives.
    replica = services.inference(STAMP, "--push-idle-timeout-s", "60")
    epoch = acquire(replica)
    state = stamp_state(7)
    payload = payload_of(state)
    quiet = Held(replica, [header(payload, 2, epoch), *data(payload, 0, BROKEN_AT)])
    wait_until(lambda: replica.model_state("stamp").pending.bytes_received == BROKEN_AT, 30)

    resumed = [header(payload, 2, epoch, resume_from=BROKEN_AT)]
    response = push(replica, [*resumed, *data(payload, BROKEN_AT, len(payload)), commit(state)])
    assert response.version == 2
    assert serves(replica, 2, state)

    # The quiet stream was ended when taken over; what it sends now is never applied.
    garbage = stamp_state(99)
    quiet.release([*data(payload_of(garbage), BROKEN_AT, len(payload)), commit(garbage)])
    with pytest.raises(grpc.RpcError) as ended:
        quiet.call.result(timeout=30)
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert "was taken over by a push resuming it" in (ended.value.details() or "")
    assert serves(replica, 2, state)
    assert served_version(replica) == "2"
    assert f"({BROKEN_AT} applied; the push was in flight)" in services.log("inference")
