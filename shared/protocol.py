"""Wire facts both services rely on: the `error-reason` trailer and the reasons it names.

A failed call ends with a gRPC status code and a message for people; where a client must act on
which of several errors sharing a code it got, the `error-reason` trailing metadata names it
with one of the constants below. The trainer acts on BASE_VERSION_MISMATCH (it pushes in full),
FENCED (it stops: another trainer writes the model) and UNKNOWN_EPOCH (it acquires the writer
lease again). Which domain error sends which reason is one table, in shared/grpc/errors.py.
These are protocol: they never change with a class's name. Beside them, the limits both sides
of a push rely on: how many hops a route may name, and how long a writer's id may be.
"""

from __future__ import annotations

from typing import Any

REASON_KEY = "error-reason"

# The most hops a push's route may name (a replica refuses a longer one, malformed-push): a
# chain feeds at most one more replica than that.
MAX_ROUTE_HOPS = 256

# The longest writer id (UTF-8 bytes) a replica takes, in AcquireWriter and in a push's header
# (malformed-push beyond it): it is recorded with every version, on disk, in every log line and
# in GetModel's and ListVersions' answers, so one of megabytes would be copied into all of them.
MAX_WRITER_ID_BYTES = 256


def writer_id_problem(writer_id: str) -> str | None:
    """Why `writer_id` is too long to be taken (over MAX_WRITER_ID_BYTES), or None."""
    size = len(writer_id.encode("utf-8", "surrogatepass"))
    if size > MAX_WRITER_ID_BYTES:
        return (
            f"the writer_id {writer_id[:32]!r}... is {size} bytes in UTF-8; at most "
            f"{MAX_WRITER_ID_BYTES}"
        )
    return None


def bytes_applied(
    state: Any, model: str, version: int, base_version: int, writer_id: str, size: int
) -> int:
    """The payload bytes a GetModel answer (`state`, a weightsync.v1.ModelState) says its
    service applied of the push to `model` that creates `version` on `base_version` from
    `writer_id`, `size` payload bytes (0: its pending push is another one, or there is none,
    or it speaks of another model). A sender whose
    push has left whole, and is not answered, watches this grow to tell a receiver that works
    on it from one that is stuck (the transport's buffers take a small push whole either
    way)."""
    pending = state.pending
    same = (
        state.model_name == model
        and state.HasField("pending")
        and pending.version == version
        and pending.base_version == base_version
        and pending.writer_id == writer_id
        and pending.payload_bytes == size
    )
    return int(pending.bytes_received) if same else 0


# INVALID_ARGUMENT
INVALID_ARGUMENT = "invalid-argument"
INVALID_INPUT = "invalid-input"
MALFORMED_PUSH = "malformed-push"
PUSH_BROKEN = "push-broken"  # the sender went away mid-push (nobody is left to read it)
MALFORMED_BATCH = "malformed-batch"  # an experience batch its buffer cannot take: drop it
OUT_OF_RANGE = "out-of-range"
# NOT_FOUND
NOT_FOUND = "not-found"
MODEL_NOT_FOUND = "model-not-found"
VERSION_NOT_SERVED = "version-not-served"
REGION_NOT_FOUND = "region-not-found"
BUFFER_NOT_FOUND = "buffer-not-found"
# FAILED_PRECONDITION
PUSH_REJECTED = "push-rejected"
INFERENCE_ONLY_MODEL = "inference-only-model"
BASE_VERSION_MISMATCH = "base-version-mismatch"  # the delta's base is not served: push in full
SEED_VERSION_MISMATCH = "seed-version-mismatch"  # the replica serves another version than named
RESUME_MISMATCH = "resume-mismatch"  # nothing matching to resume at that offset: push it whole
# ABORTED
CONFLICT = "conflict"
FENCED = "fenced"  # another writer acquired the model since: this one must stop
UNKNOWN_EPOCH = "unknown-epoch"  # the service lost the lease it granted: acquire it again

# DEADLINE_EXCEEDED
DEADLINE_EXCEEDED = "deadline-exceeded"
PUSH_STALLED = "push-stalled"
# UNAVAILABLE, RESOURCE_EXHAUSTED, UNIMPLEMENTED
UNAVAILABLE = "unavailable"
RESOURCE_LIMIT = "resource-limit"
UNSUPPORTED = "unsupported"
# DATA_LOSS
STORED_VERSION_DAMAGED = "stored-version-damaged"  # a rollback's file no longer checks out
# UNKNOWN: a ServiceError of no more specific kind (none is raised as such)
SERVICE = "service"
