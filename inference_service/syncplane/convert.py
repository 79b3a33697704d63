"""weightsync.v1 messages of the sync plane's unary calls and its domain types, both ways.

(A push's messages are decoded into parts, and its outcome encoded, in messages.py, which the
sync relay's process shares.)
"""

from __future__ import annotations

import weakref

from inference_service.persistence import StoredVersion
from inference_service.served_model import ServedModel
from inference_service.syncplane.parts import Hop
from shared.gen.weightsync.v1 import weightsync_pb2 as pb


def model_state(model: ServedModel, instance_id: str) -> pb.ModelState:
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
        instance_id=instance_id,
    )
    state.MergeFrom(_tensors(model))
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


def hop(message: pb.Hop) -> Hop:
    return Hop(message.address, message.server_name, message.writer_epoch)


# Each model's tensors as GetModel lists them (fixed for as long as the model is served),
# made once: building a message per tensor on every call took 7 ms for 2,000 tensors, and a
# trainer asks before every push.
_TENSORS: weakref.WeakKeyDictionary[ServedModel, pb.ModelState] = weakref.WeakKeyDictionary()


def _tensors(model: ServedModel) -> pb.ModelState:
    """A ModelState holding only `model`'s tensors, to merge into an answer."""
    found = _TENSORS.get(model)
    if found is None:
        found = _TENSORS[model] = pb.ModelState(
            tensors=[
                pb.TensorState(name=name, dtype=layout.dtype, shape=layout.shape)
                for name, layout in model.layout.items()
            ]
        )
    return found
