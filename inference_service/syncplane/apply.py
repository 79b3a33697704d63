"""Where a push is applied: checked, staged into the standby copy, verified, committed.

The checks (checks.py) pass first; then the push takes the model's staging transaction
(syncplane/transaction.py), streams its payload into it, has the tensors it did not carry
brought up to date, verifies the digest of the resulting state, and commits under the writer
lease's lock (a grant lands wholly before that check or after the swap). The push's partial
state is a session (resume.py), fed by one stream at a time. Any failure on the way, a writer
fenced while it streams among them, aborts the transaction: the served weights stay exactly as
they were. A stream that breaks off (its sender dies or goes quiet) suspends the session
instead, for the resume window: a push naming `resume_from` continues it; any other push, or
the window's end, drops it as a failed push is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from inference_service import metrics
from inference_service.served_model import Generation, PendingPush, ServedModel
from inference_service.syncplane.checks import (
    check_admissible,
    check_complete,
    check_digest,
    check_versions,
    model_named,
)
from inference_service.syncplane.forward import Forward
from inference_service.syncplane.inbox import TICK_S, Inbox
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, Data, PushHeader
from inference_service.syncplane.resume import Session, Sessions
from inference_service.syncplane.staging import BaseDecoder
from shared.errors import ConflictError, MalformedPushError
from shared.weights.reader import PayloadReader
from shared.weights.ties import tie_groups

logger = logging.getLogger(__name__)

# How long a push waits for the model's push slot when the push holding it has been fenced
# (it notices within a tick, or at its next part, and lets go).
ENDING_PUSH_WAIT_S = 2.0
# Held back to `--sync-max-mb-per-s`, a push is fed a slice of this many seconds' bytes at a time
# (this many bytes at least): what it passes on down its route flows that steadily.
PACED_SLICE_S = 0.25
PACED_SLICE_MIN_BYTES = 64 << 10


Onward = Callable[[PushHeader], Forward | None]


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
        self._sessions = Sessions()
        self._ties: dict[str, list[list[str]]] = {}  # per model, see tied_names()

    def apply(
        self,
        header: PushHeader,
        body: Iterable[Data | Commit],
        inbox: Inbox[object] | None = None,
    ) -> Generation:
        """Apply one push: `body`, its payload then its commit, follows `header`. While it
        waits, `inbox`, the stream `body` comes from, is watched for the writer being fenced."""
        return self.apply_push(header, body, inbox)[0]

    def apply_push(
        self,
        header: PushHeader,
        body: Iterable[Data | Commit],
        inbox: Inbox[object] | None = None,
        onward: Onward | None = None,
    ) -> tuple[Generation, Forward | None]:
        """`apply`, passing the push on as `onward` makes its forward (forward.py; None: not
        passed on); the generation committed and the push's forward, to read its results."""
        model = model_named(self._models, header.model_name)
        try:
            generation, forward = self._apply(model, header, body, inbox, onward)
        except Exception:
            metrics.PUSHES.labels(model.name, "rejected").inc()
            raise
        metrics.PUSHES.labels(model.name, "committed").inc()
        metrics.PUSH_BYTES.labels(model.name).inc(header.payload_bytes)
        metrics.MODEL_VERSION.labels(model.name).set(generation.version)
        return generation, forward

    def _apply(
        self,
        model: ServedModel,
        header: PushHeader,
        body: Iterable[Data | Commit],
        inbox: Inbox[object] | None,
        onward: Onward | None,
    ) -> tuple[Generation, Forward | None]:
        check_admissible(model, header, self._limits)
        started = time.perf_counter()
        owner = object()  # this stream, as the session's feeder
        if header.resume_from:
            window_s = self._limits.push_resume_window_s
            session = self._sessions.take_over(header, owner, window_s)
        else:
            session = self._begin(model, header, owner, onward)

        def still_wanted() -> None:
            _still_wanted(model, header, session, owner)

        if inbox is not None:
            inbox.watch(
                still_wanted,
                f" of {model.name!r} version {header.version} from {header.writer_id!r}",
            )
        try:
            digest = self._stream_into(session, owner, body, header.resume_from, still_wanted)
            received = session.reader.finish()
            check_complete(model, header, received)
            hashes = session.transaction.complete(received, session.reader.tied)
            check_digest(model, header, digest, hashes)
            self._check_ties(model, hashes)
            # Under the lease's lock: a grant lands wholly before this check or after the swap.
            with model.lease.fenced(header.writer_epoch, header.writer_id):
                generation = session.transaction.commit(header.version, header.writer_id, hashes)
            session.committed()
        except BaseException as error:
            session.end(owner, error, self._limits.push_resume_window_s)
            raise
        metrics.PUSH_SECONDS.labels(model.name).observe(time.perf_counter() - started)
        if self._on_commit is not None:
            self._on_commit(model.name)
        logger.info(
            "model %s: committed version %d from %s (%s, %d tensors, %d bytes%s, %.3fs)",
            model.name,
            header.version,
            header.writer_id,
            "full" if header.base_version == 0 else f"delta on {header.base_version}",
            len(received),
            header.payload_bytes,
            f", resumed from byte {header.resume_from}" if header.resume_from else "",
            time.perf_counter() - started,
        )
        return generation, session.forward

    def _check_ties(self, model: ServedModel, hashes: Mapping[str, bytes]) -> None:
        """Refuse a state that gives tensors the model ties (one memory under several names)
        different values: only one of them could be served, not the state the digest names."""
        ties = self._ties.get(model.name)
        if ties is None:
            ties = self._ties[model.name] = tied_names(model.live.module)
        for names in ties:
            if len({hashes[name] for name in names}) > 1:
                raise MalformedPushError(
                    f"model {model.name!r}: tensors {', '.join(map(repr, names))} are one "
                    "tensor in this model (tied: they share memory), but the push gives them "
                    "different values; push them equal, or untie them in the app"
                )

    def _begin(
        self, model: ServedModel, header: PushHeader, owner: object, onward: Onward | None
    ) -> Session:
        """A new push's session: the model's push slot and standby copy, its reader."""
        self._sessions.drop_suspended(model.name)  # another push starts: drop a broken one
        pending = PendingPush(
            header.writer_id,
            header.version,
            header.base_version,
            header.payload_bytes,
            writer_epoch=header.writer_epoch,
        )
        lease = model.lease
        # A push being ended lets go of the model soon: one from a fenced writer, or one its
        # own writer has given up on (it pushes the same or a newer version under its lease).
        other = model.pending
        wait = 0.0
        if other is not None and other.writer_epoch != lease.epoch:
            wait = ENDING_PUSH_WAIT_S
        elif other is not None and _supersedes(header, other, lease.epoch):
            other.superseded_by = header.version
            wait = ENDING_PUSH_WAIT_S
        ending = self._sessions.get(model.name)
        if wait and ending is not None and ending.pending is other:
            ending.abandon()  # its forward must not hold it up
        staging = model.begin_push(pending, self._limits.drain_timeout_s, wait)
        try:
            check_versions(model, header)  # again: a push may have committed meanwhile
            # A delta's encoded tensors decode against the live copy: its base (checked above).
            decoder = (
                BaseDecoder(model.name, staging.live.committed, staging.decode)
                if header.base_version
                else None
            )
            reader = PayloadReader(
                header.payload_bytes, model.layout, staging, self._limits.max_header_bytes, decoder
            )
            forward = onward(header) if onward is not None else None
        except BaseException:
            staging.abort()
            raise
        session = Session(
            model, header, staging, reader, pending, forward, owner, self._sessions.remove
        )
        self._sessions.add(session)
        return session

    def _stream_into(
        self,
        session: Session,
        owner: object,
        body: Iterable[Data | Commit],
        offset: int,
        still_wanted: Callable[[], None],
    ) -> bytes:
        """Feed `body`, the payload from `offset` on, into `session`; the commit's digest.
        Held back to the rate limit, the push is fed (applied and passed on down its route) a
        slice of PACED_SLICE_S's bytes at a time, each once the bytes before it are due at that
        rate, and the commit as soon as it comes: the hop a push is passed on to gets bytes at
        least that often, and the commit right after the last of them, never a whole part's or
        a whole push's wait with nothing (which it would take for a sender gone quiet, ending
        the push after its `--push-idle-timeout-s`). As it waits, the push checks
        `still_wanted` each TICK_S: one superseded, fenced or taken over meanwhile ends at once
        and lets the model go (a push waits ENDING_PUSH_WAIT_S at most for that), however long
        its wait was to be."""
        rate = self._limits.max_bytes_per_s
        step = max(int(rate * PACED_SLICE_S), PACED_SLICE_MIN_BYTES)
        started = time.monotonic()
        sent = 0
        for part in body:
            if isinstance(part, Commit):
                session.seal(owner, part.digest)
                return part.digest
            pieces = [part]
            if rate and len(part) > step:
                view = memoryview(part)
                pieces = [view[i : i + step] for i in range(0, len(part), step)]
            for piece in pieces:
                if rate:  # ahead of the allowed rate: wait (HTTP/2 flow control slows the sender)
                    until = started + sent / rate
                    while (ahead := until - time.monotonic()) > 0:
                        still_wanted()
                        time.sleep(min(ahead, TICK_S))
                session.feed(owner, offset + sent, piece)
                sent += len(piece)
        raise MalformedPushError(
            f"the push stream ended after {offset + sent} payload bytes without a commit"
        )


def tied_names(module: nn.Module) -> list[list[str]]:
    """The groups of state-dict names that are one tensor of `module` (a tied or twice
    registered parameter, a buffer that is a parameter's memory: shared/weights/ties.py)."""
    return tie_groups(module.state_dict(keep_vars=True))


def _supersedes(header: PushHeader, other: PendingPush, epoch: int) -> bool:
    """Whether the push `header` opens ends `other`, in flight: both from the lease holder
    under the current epoch, for a version at least as new (the writer gave the other up)."""
    return (
        header.writer_epoch == epoch
        and other.writer_epoch == epoch
        and header.writer_id == other.writer_id
        and header.version >= other.version
    )


def _still_wanted(model: ServedModel, header: PushHeader, session: Session, owner: object) -> None:
    """Raise if the push must end now: its writer was fenced, it gave the push up for a newer
    one (superseded), or a push resuming it took it over from this stream."""
    model.lease.check(header.writer_epoch, header.writer_id)
    session.check_owner(owner)
    pending = session.pending
    if pending.superseded_by:
        raise ConflictError(
            f"model {model.name!r}: this push of version {header.version} from "
            f"{header.writer_id!r} was superseded by its push of version "
            f"{pending.superseded_by}; it was ended and nothing was swapped"
        )
