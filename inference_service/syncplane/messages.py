"""weightsync.v1 Push messages and push parts: requests decoded into parts, the outcome encoded.

The one place a push's protobuf is read, by both transports: the gRPC servicer in this process,
and the sync relay in its own (which then carries the parts over its push link as they are).
Its imports stay light for the relay's sake. A data message encoded as the sender encodes it
(shared/weights/wire.py) becomes a zero-copy view of its payload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

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
        )
    return Empty()


def parts(messages: Iterable[bytes | memoryview | None]) -> Iterator[Part | None]:
    """A gRPC request stream's messages as parts, ticks (None) passed on; a stream that breaks
    off (the sender cancelled or went away) raises SenderGone."""
    try:
        for message in messages:
            yield None if message is None else decode(message)
    except grpc.RpcError:
        raise SenderGone() from None


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


def hop_results(response: pb.PushResponse) -> tuple[HopResult, ...]:
    return tuple(
        HopResult(h.address, h.version, h.code, h.reason, h.message) for h in response.hops
    )


def push_response(outcome: PushOutcome) -> pb.PushResponse:
    return pb.PushResponse(
        model_name=outcome.model_name,
        version=outcome.version,
        digest=outcome.digest,
        payload_bytes=outcome.payload_bytes,
        hops=[
            pb.HopResult(
                address=h.address,
                version=h.version,
                code=h.code,
                reason=h.reason,
                message=h.message,
            )
            for h in outcome.hops
        ],
    )
