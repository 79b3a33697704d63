"""weightsync.v1 Push messages and push parts: requests decoded into parts, the outcome encoded.

The one place a push's protobuf is read, by both transports: the gRPC servicer in this process,
and the sync relay in its own (which then carries the parts over its push link as they are).
Its imports stay light for the relay's sake. A data message encoded as the sender encodes it
(shared/weights/wire.py) becomes a zero-copy view of its payload.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
from google.protobuf.message import DecodeError

from inference_service.syncplane.parts import (
    Commit,
    Empty,
    Hop,
    HopResult,
    Part,
    PushHeader,
    PushOutcome,
    SenderGone,
)
from shared.errors import MalformedPushError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights import wire

# How long a stream that ended before its commit is watched for its call being cancelled.
CANCEL_GRACE_S = 0.25


def decode(message: bytes | memoryview) -> Part:
    """One PushRequest as a part; MalformedPushError if it is not a PushRequest at all."""
    payload = wire.data_payload(message)
    if payload is not None:
        return payload
    try:
        request = pb.PushRequest.FromString(message)
    except DecodeError:
        raise MalformedPushError(
            "a push message is not a valid weightsync.v1.PushRequest"
        ) from None
    kind = request.WhichOneof("kind")
    if kind == "data":
        data: bytes = request.data
        return data
    if kind == "commit":
        return Commit(request.commit.digest)
    if kind == "header":
        h = request.header
        route = tuple(Hop(r.address, r.server_name, r.writer_epoch) for r in h.route)
        return PushHeader(
            h.model_name,
            h.version,
            h.base_version,
            h.writer_id,
            h.payload_bytes,
            h.writer_epoch,
            route,
            h.resume_from,
        )
    return Empty()


def parts(
    messages: Iterable[bytes | memoryview | None], active: Callable[[], bool] | None = None
) -> Iterator[Part | None]:
    """A gRPC request stream's messages as parts, ticks (None) passed on; a stream that breaks
    off (the sender cancelled or went away) raises SenderGone. `active`: whether the call is
    still on (its context's is_active): a cancelled stream may first end as if its sender had
    closed it, so one that ends before a commit is SenderGone if the call goes off within
    CANCEL_GRACE_S."""
    last: Part | None = None
    try:
        for message in messages:
            part = None if message is None else decode(message)
            last = part if part is not None else last
            yield part
    except grpc.RpcError:
        raise SenderGone() from None
    if active is not None and not isinstance(last, Commit) and _goes_off(active):
        raise SenderGone()


def _goes_off(active: Callable[[], bool]) -> bool:
    """Whether the call is off, or goes off within CANCEL_GRACE_S."""
    deadline = time.monotonic() + CANCEL_GRACE_S
    while active():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def encode_header(header: PushHeader) -> bytes:
    """The serialized PushRequest carrying `header` (a forwarded push's first message): every
    field of the part under its own name on the wire."""
    fields = {f.name: getattr(header, f.name) for f in dataclasses.fields(header)}
    route = [
        pb.Hop(address=h.address, server_name=h.server_name, writer_epoch=h.writer_epoch)
        for h in fields.pop("route")
    ]
    encoded: bytes = pb.PushRequest(header=pb.PushHeader(**fields, route=route)).SerializeToString()
    return encoded


def encode_commit(digest: bytes) -> bytes:
    encoded: bytes = pb.PushRequest(commit=pb.PushCommit(digest=digest)).SerializeToString()
    return encoded


def push_response(outcome: PushOutcome) -> pb.PushResponse:
    return pb.PushResponse(
        model_name=outcome.model_name,
        version=outcome.version,
        digest=outcome.digest,
        payload_bytes=outcome.payload_bytes,
        hops=[hop_result(h) for h in outcome.hops],
        finish_seconds=outcome.finish_s,
    )


def hop_result(result: HopResult) -> pb.HopResult:
    return pb.HopResult(
        address=result.address,
        version=result.version,
        code=result.code,
        reason=result.reason,
        message=result.message,
    )
