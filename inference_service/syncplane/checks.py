"""The checks of a push that live here, and where they stand among the others, in the order
they run.

1. The header on its own (`check_header`): bounded counters, a model, a version after its base,
   a writer id of at most protocol.MAX_WRITER_ID_BYTES.
   Its route, where it has one: each hop a dialable address, none named twice, none this
   replica (forward.py `check_route`, handler.py).
2. The header against the model: it exists (`model_named`), then `check_admissible`: it accepts
   pushes, the size limit, then `check_versions`: the writer's epoch, a
   newer version, a base that is served. The versions are checked again once the push holds the
   model (a push may have committed meanwhile). A push resuming a broken one must match the
   push kept, and its offset the bytes applied (resume.py).
3. The payload's safetensors header against the model's tensors, and the byte counts, as the
   stream arrives (shared/weights/reader.py).
4. After the payload: a full push carries every tensor (`check_complete`), the digest of the
   state it makes is the one its commit names (`check_digest`), and tensors the model ties are
   given one value (apply.py `_check_ties`).
5. The writer's epoch once more, under the lease's lock, as the swap happens (apply.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from inference_service.lease import check_counter
from inference_service.served_model import ServedModel
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import PushHeader
from shared import protocol
from shared.errors import (
    BaseVersionMismatchError,
    ConflictError,
    InferenceOnlyModelError,
    MalformedPushError,
    ModelNotFoundError,
    ResourceLimitError,
)


def check_header(header: PushHeader) -> None:
    # uint64 on the wire: bounded before anything else looks at them
    check_counter("the push header's version", header.version)
    check_counter("the push header's base_version", header.base_version)
    check_counter("the push header's writer_epoch", header.writer_epoch)
    check_counter("the push header's resume_from", header.resume_from)
    if not header.model_name:
        raise MalformedPushError("the push header names no model")
    if header.version == 0:
        raise MalformedPushError("the push header's version must be at least 1")
    if header.base_version >= header.version:
        raise MalformedPushError(
            f"base_version {header.base_version} must be older than version {header.version}"
        )
    problem = protocol.writer_id_problem(header.writer_id)
    if problem is not None:
        raise MalformedPushError(f"the push header: {problem}")


def model_named(models: Mapping[str, ServedModel], name: str) -> ServedModel:
    model = models.get(name)
    if model is None:
        known = ", ".join(sorted(models)) or "none"
        raise ModelNotFoundError(f"no model named {name!r} is served here (served: {known})")
    return model


def check_admissible(model: ServedModel, header: PushHeader, limits: SyncLimits) -> None:
    if not model.accepts_pushes:
        raise InferenceOnlyModelError(
            f"model {model.name!r} is inference-only: it serves its pretrained weights and "
            "refuses pushes"
        )
    if header.payload_bytes > limits.max_payload_bytes:
        raise ResourceLimitError(
            f"push of {header.payload_bytes} bytes exceeds the "
            f"{limits.max_payload_bytes}-byte limit"
        )
    check_versions(model, header)


def check_versions(model: ServedModel, header: PushHeader) -> None:
    model.lease.check(header.writer_epoch, header.writer_id)  # a push never moves the lease
    live = model.live
    if header.version <= live.version:
        writer = f" (written by {live.writer_id!r})" if live.writer_id else ""
        raise ConflictError(
            f"model {model.name!r}: version {header.version} is not newer than the served "
            f"version {live.version}{writer}"
        )
    if header.base_version not in (0, live.version):
        raise BaseVersionMismatchError(
            f"model {model.name!r}: the delta applies to version {header.base_version} but "
            f"version {live.version} is served; push the full weights"
        )


def check_complete(model: ServedModel, header: PushHeader, received: Mapping[str, bytes]) -> None:
    if header.base_version == 0 and len(received) != len(model.layout):
        missing = sorted(set(model.layout) - set(received))
        raise MalformedPushError(
            f"a full push must carry every tensor; missing: {', '.join(missing[:10])}"
        )


def check_digest(
    model: ServedModel, header: PushHeader, digest: bytes, hashes: dict[str, bytes]
) -> None:
    expected = model.digest_of(hashes)
    if digest != expected:
        raise MalformedPushError(
            f"digest mismatch for {model.name!r} version {header.version}: the commit "
            f"says {digest.hex()} but the weights received hash to {expected.hex()}; "
            "nothing was swapped"
        )
