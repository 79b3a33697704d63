"""Push sessions: one push's partial state, which outlives a broken stream so that a push
naming `resume_from` continues it instead of starting over.

A session holds what makes a push's applied bytes count: its staging transaction (the model's
push slot and the standby copy being filled), its payload reader (the safetensors header read,
the tensor being hashed, an encoded tensor being gathered), the pending record GetModel reports,
and its forward down the route (forward.py). One stream feeds it at a time, its owner; every
chunk is passed on and applied under the session's lock, after checking the owner.

A stream that breaks before the commit (its sender went away, or sent nothing for the idle
timeout) after some payload bytes were applied suspends the session for the resume window
(`--push-resume-window-s`); GetModel's `pending` still shows it, with the bytes applied. A
push superseded by its writer's newer one, fenced, or refused for its content is dropped at
once. A push from the same writer that names the same identity (model, version, base
version, writer, epoch, payload size) and a `resume_from` at most the bytes applied takes it
over, suspended or still in flight (a sender whose link went dark looks alive until TCP gives
up): the old stream never applies another byte after that, and ends (ABORTED) without
touching the state it lost. The new stream's bytes before the offset applied are skipped.
Anything else is refused (FAILED_PRECONDITION, `resume-mismatch`) before a byte is applied.
When the window passes, or another push starts, a suspended session is dropped exactly as a
failed push is: the transaction aborts (the standby's bookkeeping says which tensors were
written) and the forward is cancelled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from inference_service.served_model import PendingPush, ServedModel
from inference_service.syncplane.forward import Forward
from inference_service.syncplane.parts import Data, PushHeader
from inference_service.syncplane.transaction import StagingTransaction
from shared.errors import ConflictError, PushBrokenError, PushStalledError, ResumeMismatchError
from shared.weights.reader import PayloadReader

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """What a resuming push must name exactly as the push it continues did."""

    model_name: str
    version: int
    base_version: int
    writer_id: str
    writer_epoch: int
    payload_bytes: int

    @classmethod
    def of(cls, header: PushHeader) -> Identity:
        return cls(
            header.model_name,
            header.version,
            header.base_version,
            header.writer_id,
            header.writer_epoch,
            header.payload_bytes,
        )

    def differences(self, other: Identity) -> str:
        """`field kept/named` for each field that differs, comma separated."""
        return ", ".join(
            f"{name} {getattr(self, name)!r}/{getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        )


def resumable(error: BaseException) -> bool:
    """Whether a stream that failed with `error` broke off (its sender went away or went
    quiet), leaving a push another stream may continue."""
    return isinstance(error, PushBrokenError | PushStalledError)


class Session:
    """One push's partial state, fed by one stream (its owner) at a time: see the module
    docstring. `on_end` hears when it ends (committed or dropped)."""

    def __init__(
        self,
        model: ServedModel,
        header: PushHeader,
        transaction: StagingTransaction,
        reader: PayloadReader,
        pending: PendingPush,
        forward: Forward | None,
        owner: object,
        on_end: Callable[[Session], None],
    ) -> None:
        self.model = model
        self.identity = Identity.of(header)
        self.transaction = transaction
        self.reader = reader
        self.pending = pending
        self.forward = forward
        self._owner: object | None = owner
        self._on_end = on_end
        self._lock = threading.Lock()  # held while a chunk is passed on and applied
        self._sealed = False  # its commit arrived: it can only commit or fail now
        self._ended = False
        self._timer: threading.Timer | None = None

    def _what(self) -> str:
        i = self.identity
        return f"model {i.model_name!r}: the push of version {i.version} from {i.writer_id!r}"

    def check_owner(self, owner: object) -> None:
        """Raise if another stream has taken the push over from `owner`."""
        if self._owner is not owner:
            raise ConflictError(
                f"{self._what()} was taken over by a push resuming it; this stream was ended "
                "and applies nothing more"
            )

    def feed(self, owner: object, offset: int, data: Data) -> None:
        """Pass on and apply `data`, the payload bytes from `offset` on, skipping those
        already applied."""
        with self._lock:
            self.check_owner(owner)
            applied = self.reader.received
            if offset + len(data) <= applied:
                return
            if offset < applied:
                data = memoryview(data)[applied - offset :]
            if self.forward is not None:
                self.forward.send_data(data)
            self.reader.feed(data)
            self.pending.bytes_received = self.reader.received

    def seal(self, owner: object, digest: bytes) -> None:
        """The commit arrived: pass it on; no stream can take the push over any more."""
        with self._lock:
            self.check_owner(owner)
            self._sealed = True
            if self.forward is not None:
                self.forward.send_commit(digest)

    def take_over(self, header: PushHeader, owner: object) -> None:
        """Make `owner`, the stream of `header` (which names `resume_from`), feed this push
        from now on; ResumeMismatchError, taking nothing over, unless it continues it."""
        with self._lock:
            if self._ended or self._sealed:
                state = "it is committing" if self._sealed else "it was dropped"
                raise ResumeMismatchError(
                    f"{self._what()} is no longer kept to resume ({state}); nothing was "
                    "applied: push it whole"
                )
            named = Identity.of(header)
            if named != self.identity:
                raise ResumeMismatchError(
                    f"{self._what()} is kept to resume, but this push names another one "
                    f"(kept/named: {self.identity.differences(named)}); nothing was applied"
                )
            applied = self.reader.received
            if header.resume_from > applied:
                raise ResumeMismatchError(
                    f"{self._what()} has {applied} payload bytes applied; resume_from "
                    f"{header.resume_from} is past them; nothing was applied"
                )
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            taken = "in flight" if self._owner is not None else "suspended"
            self._owner = owner
        logger.info(
            "%s: resumed from byte %d (%d applied; the push was %s)",
            self._what(),
            header.resume_from,
            applied,
            taken,
        )

    def end(self, owner: object, error: BaseException, window_s: float) -> None:
        """The stream `owner` failed with `error`: suspend the push for `window_s` if the
        stream broke off and the push can go on, else drop it. Nothing, if another stream
        took it over."""
        with self._lock:
            if self._owner is not owner or self._ended:
                return
            self._owner = None
            keep = (
                window_s > 0
                and resumable(error)
                and self.reader.received > 0  # (a resume starts past byte 0)
                and not self._sealed
                and not self.pending.superseded_by
            )
            if keep:
                self._timer = threading.Timer(window_s, self._expire)
                self._timer.daemon = True
                self._timer.start()
                logger.info(
                    "%s broke off after %d payload bytes; kept %gs for a push resuming it",
                    self._what(),
                    self.reader.received,
                    window_s,
                )
                return
            self._drop()

    def drop_if_suspended(self) -> bool:
        """Drop the push if no stream feeds it (another push is starting); whether it did."""
        with self._lock:
            if self._owner is not None or self._ended:
                return False
            logger.info("%s, kept to resume, was dropped for another push", self._what())
            self._drop()
            return True

    def abandon(self) -> None:
        """From another push's thread: this push is being ended (superseded or fenced); its
        forward stops at once, so that its stream lets the model go soon."""
        if self.forward is not None:
            self.forward.abandon()

    def committed(self) -> None:
        """The owner committed the push (its transaction let the slot go)."""
        with self._lock:
            self._ended = True
        self._on_end(self)

    def _expire(self) -> None:
        with self._lock:
            if self._owner is not None or self._ended:
                return
            logger.info("%s was not resumed in time and was dropped", self._what())
            self._drop()

    def _drop(self) -> None:
        """End the push as a failed one (holding the lock): abort, cancel the forward."""
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_end(self)
        try:
            if self.forward is not None:
                self.forward.cancel()
        finally:
            self.transaction.abort()


class Sessions:
    """The push session of each model, in flight or suspended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[str, Session] = {}

    def add(self, session: Session) -> None:
        with self._lock:
            self._by_model[session.identity.model_name] = session

    def remove(self, session: Session) -> None:
        with self._lock:
            if self._by_model.get(session.identity.model_name) is session:
                del self._by_model[session.identity.model_name]

    def get(self, model_name: str) -> Session | None:
        with self._lock:
            return self._by_model.get(model_name)

    def take_over(self, header: PushHeader, owner: object, window_s: float) -> Session:
        """The session `header` resumes, now fed by `owner`; ResumeMismatchError if none."""
        session = self.get(header.model_name)
        if session is None:
            raise ResumeMismatchError(
                f"model {header.model_name!r}: no push of version {header.version} from "
                f"{header.writer_id!r} is kept here to resume (a broken push is kept "
                f"{window_s:g}s, until another push starts); nothing was applied: push it whole"
            )
        session.take_over(header, owner)
        return session

    def drop_suspended(self, model_name: str) -> None:
        """Drop the model's suspended push, if any: another push is starting."""
        session = self.get(model_name)
        if session is not None:
            session.drop_if_suspended()
