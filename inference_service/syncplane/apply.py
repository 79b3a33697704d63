"""Where a push is applied: checked, staged into the standby copy, verified, committed.

The checks (checks.py) pass first; then the push takes the model's staging transaction
(syncplane/transaction.py), streams its payload into it, has the tensors it did not carry
brought up to date, verifies the digest of the resulting state, and commits under the writer
lease's lock (a grant lands wholly before that check or after the swap). Any failure on the
way, a sender that dies or stalls mid-stream or a writer fenced while it streams among them,
aborts the transaction: the served weights stay exactly as they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from inference_service import metrics
from inference_service.served_model import Generation, PendingPush, ServedModel
from inference_service.syncplane.checks import (
    check_admissible,
    check_complete,
    check_digest,
    check_versions,
    model_named,
)
from inference_service.syncplane.inbox import Inbox
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, Data, PushHeader
from inference_service.syncplane.staging import BaseDecoder
from shared.errors import ConflictError, MalformedPushError
from shared.weights.reader import PayloadReader

logger = logging.getLogger(__name__)

# How long a push waits for the model's push slot when the push holding it has been fenced
# (it notices within a tick, or at its next part, and lets go).
ENDING_PUSH_WAIT_S = 2.0


class PushApplier:
    """Applies pushes to the models they name; `on_commit(name)` hears of each commit."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        limits: SyncLimits,
        on_commit: Callable[[str], None] | None = None,
    ) -> None:
        self._models = models
        self._limits = limits
        self._on_commit = on_commit

    def apply(
        self,
        header: PushHeader,
        body: Iterable[Data | Commit],
        inbox: Inbox[object] | None = None,
    ) -> Generation:
        """Apply one push: `body`, its payload then its commit, follows `header`. While it
        waits, `inbox`, the stream `body` comes from, is watched for the writer being fenced."""
        model = model_named(self._models, header.model_name)
        try:
            generation = self._apply(model, header, body, inbox)
        except Exception:
            metrics.PUSHES.labels(model.name, "rejected").inc()
            raise
        metrics.PUSHES.labels(model.name, "committed").inc()
        metrics.PUSH_BYTES.labels(model.name).inc(header.payload_bytes)
        metrics.MODEL_VERSION.labels(model.name).set(generation.version)
        return generation

    def _apply(
        self,
        model: ServedModel,
        header: PushHeader,
        body: Iterable[Data | Commit],
        inbox: Inbox[object] | None,
    ) -> Generation:
        check_admissible(model, header, self._limits)
        started = time.perf_counter()
        pending = PendingPush(
            header.writer_id,
            header.version,
            header.base_version,
            header.payload_bytes,
            writer_epoch=header.writer_epoch,
        )
        lease = model.lease
        if inbox is not None:
            inbox.watch(
                lambda: _still_wanted(model, header, pending),
                f" of {model.name!r} version {header.version} from {header.writer_id!r}",
            )
        # A push being ended lets go of the model soon: one from a fenced writer, or one its
        # own writer has given up on (it pushes the same or a newer version under its lease).
        other = model.pending
        wait = 0.0
        if other is not None and other.writer_epoch != lease.epoch:
            wait = ENDING_PUSH_WAIT_S
        elif other is not None and _supersedes(header, other, lease.epoch):
            other.superseded_by = header.version
            wait = ENDING_PUSH_WAIT_S
        with model.begin_push(pending, self._limits.drain_timeout_s, wait) as staging:
            check_versions(model, header)  # again: a push may have committed meanwhile
            # A delta's encoded tensors decode against the live copy: its base (checked above).
            decoder = (
                BaseDecoder(model.name, staging.live.module.state_dict())
                if header.base_version
                else None
            )
            reader = PayloadReader(
                header.payload_bytes, model.layout, staging, self._limits.max_header_bytes, decoder
            )
            digest = self._stream_into(reader, body, pending)
            received = reader.finish()
            check_complete(model, header, received)
            hashes = staging.complete(received)
            check_digest(model, header, digest, hashes)
            # Under the lease's lock: a grant lands wholly before this check or after the swap.
            with lease.fenced(header.writer_epoch, header.writer_id):
                generation = staging.commit(header.version, header.writer_id, hashes)
        metrics.PUSH_SECONDS.labels(model.name).observe(time.perf_counter() - started)
        if self._on_commit is not None:
            self._on_commit(model.name)
        logger.info(
            "model %s: committed version %d from %s (%s, %d tensors, %d bytes, %.3fs)",
            model.name,
            header.version,
            header.writer_id,
            "full" if header.base_version == 0 else f"delta on {header.base_version}",
            len(received),
            header.payload_bytes,
            time.perf_counter() - started,
        )
        return generation

    def _stream_into(
        self, reader: PayloadReader, body: Iterable[Data | Commit], pending: PendingPush
    ) -> bytes:
        rate = self._limits.max_bytes_per_s
        started = time.monotonic()
        for part in body:
            if isinstance(part, Commit):
                return part.digest
            reader.feed(part)
            pending.bytes_received = reader.received
            if rate:  # ahead of the allowed rate: wait (HTTP/2 flow control slows the sender)
                ahead = reader.received / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        raise MalformedPushError(
            f"the push stream ended after {reader.received} payload bytes without a commit"
        )


def _supersedes(header: PushHeader, other: PendingPush, epoch: int) -> bool:
    """Whether the push `header` opens ends `other`, in flight: both from the lease holder
    under the current epoch, for a version at least as new (the writer gave the other up)."""
    return (
        header.writer_epoch == epoch
        and other.writer_epoch == epoch
        and header.writer_id == other.writer_id
        and header.version >= other.version
    )


def _still_wanted(model: ServedModel, header: PushHeader, pending: PendingPush) -> None:
    """Raise if the push must end now: its writer was fenced, or it gave the push up for a
    newer one (superseded)."""
    model.lease.check(header.writer_epoch, header.writer_id)
    if pending.superseded_by:
        raise ConflictError(
            f"model {model.name!r}: this push of version {header.version} from "
            f"{header.writer_id!r} was superseded by its push of version "
            f"{pending.superseded_by}; it was ended and nothing was swapped"
        )
