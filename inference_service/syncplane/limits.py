"""The sync plane's limits: sizes, waits and rates a push is held to."""

from __future__ import annotations

from dataclasses import dataclass

from shared.grpc.limits import CallBudget

# The methods that answer at once from what the replica holds: they take slots of their own
# (shared/grpc/limits.py), so that a replica taking pushes at its limit still tells a trainer
# what it serves.
LOOKUPS = frozenset(
    f"/weightsync.v1.WeightSync/{method}" for method in ("GetModel", "ListModels", "ListVersions")
)


def sync_budget(max_concurrent: int) -> CallBudget:
    """The sync plane's calls at once: `max_concurrent` pushes, seeds and writes, and lookups."""
    return CallBudget(max_concurrent, "sync plane", lookups=LOOKUPS)


@dataclass(frozen=True)
class SyncLimits:
    max_payload_bytes: int = 64 << 30
    max_header_bytes: int = 16 << 20
    drain_timeout_s: float = 30.0
    max_concurrent: int = 8
    # Receive weights no faster than this (bytes/s; 0: as fast as they come). Spreading a
    # push's CPU cost over time keeps it from showing in the data plane's tail latency.
    max_bytes_per_s: float = 0.0
    # A push that sends nothing for this long is ended (DEADLINE_EXCEEDED), freeing the model.
    push_idle_timeout_s: float = 5.0
    # A push whose stream broke off before its commit is kept this long for a push resuming it
    # (resume_from; resume.py); 0: not kept.
    push_resume_window_s: float = 5.0
