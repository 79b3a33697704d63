"""The only place that knows both the weightsync.v1 messages and the sync plane's domain types."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.message import DecodeError

from inference_service.lease import check_counter
from inference_service.persistence import StoredVersion
from inference_service.served_model import Generation, ServedModel
from inference_service.syncplane.receiver import Commit, PushHeader, PushReceiver
from shared.errors import MalformedPushError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights import wire


def _parse(message: bytes | memoryview) -> pb.PushRequest | memoryview:
    try:
        return wire.decode(message)
    except DecodeError:
        raise MalformedPushError(
            "a push message is not a valid weightsync.v1.PushRequest"
        ) from None


def _kind(message: pb.PushRequest | memoryview) -> str:
    return "data" if isinstance(message, memoryview) else message.WhichOneof("kind") or "empty"


def read_header(messages: Iterator[bytes | memoryview]) -> PushHeader:
    """The push header, which must be the stream's first message."""
    try:
        raw = next(messages, None)
    except grpc.RpcError:
        raise MalformedPushError("the sender cancelled the push before its header") from None
    if raw is None:
        raise MalformedPushError("empty push stream: the first message must be a PushHeader")
    first = _parse(raw)
    if isinstance(first, memoryview) or first.WhichOneof("kind") != "header":
        raise MalformedPushError(
            f"the first message of a push must be a header, not {_kind(first)}"
        )
    h = first.header
    # uint64 on the wire: bounded before anything else looks at them
    check_counter("the push header's version", h.version)
    check_counter("the push header's base_version", h.base_version)
    check_counter("the push header's writer_epoch", h.writer_epoch)
    if not h.model_name:
        raise MalformedPushError("the push header names no model")
    if h.version == 0:
        raise MalformedPushError("the push header's version must be at least 1")
    if h.base_version >= h.version:
        raise MalformedPushError(
            f"base_version {h.base_version} must be older than version {h.version}"
        )
    return PushHeader(
        h.model_name, h.version, h.base_version, h.writer_id, h.payload_bytes, h.writer_epoch
    )


def read_parts(messages: Iterator[bytes | memoryview]) -> Iterator[memoryview | bytes | Commit]:
    """Payload chunks, then the commit; the commit must be the stream's last message."""
    received = 0
    try:
        for raw in messages:
            message = _parse(raw)
            if isinstance(message, memoryview):
                received += len(message)
                yield message
                continue
            kind = _kind(message)
            if kind == "data":
                received += len(message.data)
                yield message.data
            elif kind == "commit":
                if next(messages, None) is not None:
                    raise MalformedPushError("messages follow the commit; it must come last")
                yield Commit(message.commit.digest)
                return
            else:
                raise MalformedPushError(f"unexpected {kind} message inside a push")
    except grpc.RpcError:
        raise MalformedPushError(
            f"the sender cancelled the push after {received} payload bytes"
        ) from None


def run_push(
    receiver: PushReceiver, messages: Iterator[bytes | memoryview | None]
) -> pb.PushResponse:
    """One push, whichever transport brought it: `messages` as it delivers them, with a None
    each TICK_S (inference_service/syncplane/inbox.py) that passes without one."""
    inbox = receiver.inbox(messages)
    header = read_header(inbox)
    generation = receiver.receive(header, read_parts(inbox), inbox)
    return push_response(header, generation)


def push_response(header: PushHeader, generation: Generation) -> pb.PushResponse:
    return pb.PushResponse(
        model_name=header.model_name,
        version=generation.version,
        digest=generation.digest,
        payload_bytes=header.payload_bytes,
    )


def model_state(model: ServedModel) -> pb.ModelState:
    live = model.live
    epoch, holder = model.lease.snapshot()
    state = pb.ModelState(
        model_name=model.name,
        version=live.version,
        digest=live.digest,
        writer_id=live.writer_id,
        accepts_pushes=model.accepts_pushes,
        lease_holder=holder,
        writer_epoch=epoch,
        tensors=[
            pb.TensorState(name=name, dtype=layout.dtype, shape=layout.shape)
            for name, layout in model.layout.items()
        ],
    )
    pending = model.pending
    if pending is not None:
        state.pending.CopyFrom(
            pb.PendingPush(
                writer_id=pending.writer_id,
                version=pending.version,
                base_version=pending.base_version,
                bytes_received=pending.bytes_received,
                payload_bytes=pending.payload_bytes,
            )
        )
    return state


def versions(name: str, model: ServedModel, stored: list[StoredVersion]) -> pb.ListVersionsResponse:
    return pb.ListVersionsResponse(
        model_name=name,
        serving=model.live.version,
        versions=[
            pb.VersionInfo(
                version=v.version,
                writer_id=v.writer_id,
                digest=v.digest,
                committed_at=v.committed_at,
                size_bytes=v.size_bytes,
            )
            for v in stored
        ],
    )
