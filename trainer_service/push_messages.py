"""The messages of one push, serialized: its header, its payload in data messages cut straight
from tensor memory, and its commit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights import wire
from trainer_service.progress import Progress

if TYPE_CHECKING:
    from trainer_service.push import PushPlan


def push_header(plan: PushPlan) -> pb.PushHeader:
    """The header of `plan`'s push."""
    return pb.PushHeader(
        model_name=plan.model_name,
        version=plan.version,
        base_version=plan.base_version,
        writer_id=plan.writer_id,
        payload_bytes=plan.payload.nbytes,
        writer_epoch=plan.writer_epoch,
        route=[
            pb.Hop(address=h.address, server_name=h.server_name, writer_epoch=h.writer_epoch)
            for h in plan.route
        ],
    )


def requests(plan: PushPlan, chunk_bytes: int, progress: Progress | None = None) -> Iterator[bytes]:
    """The serialized messages of one push; data messages are cut straight from tensor memory."""
    yield pb.PushRequest(header=push_header(plan)).SerializeToString()
    hashes = plan.streamed_hashes if plan.digest is None else None
    for pieces in plan.payload.pieces(chunk_bytes, hashes):
        message = wire.encode_data(pieces)
        yield message
        if progress is not None:
            progress.advance(len(message))
    digest = plan.digest
    if digest is None:
        assert plan.table is not None, "a plan without a digest names the state's table"
        digest = plan.table.digest(plan.streamed_hashes)
    if progress is not None:
        progress.done()
    yield pb.PushRequest(commit=pb.PushCommit(digest=digest)).SerializeToString()
