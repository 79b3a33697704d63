"""One push, whichever transport brought it: the one handler the gRPC servicer and the relay's
push link both call.

A transport hands over the push's parts (parts.py) as they arrive, with a None each TICK_S
(inbox.py) that passes without one. The handler reads them in order (a header first, the commit
last and alone at the end), checks the header (checks.py) and has the push applied (apply.py),
watching for a sender that goes quiet or a writer fenced meanwhile. Whatever fails raises a
domain error; each transport answers with the one error table (shared/grpc/errors.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from inference_service.syncplane import forward
from inference_service.syncplane.apply import PushApplier
from inference_service.syncplane.checks import check_header
from inference_service.syncplane.forward import PeerAccess
from inference_service.syncplane.inbox import Inbox
from inference_service.syncplane.own import OwnAddress
from inference_service.syncplane.parts import (
    Commit,
    Data,
    Part,
    PushHeader,
    PushOutcome,
    SenderGone,
    kind,
)
from shared.errors import MalformedPushError, PushBrokenError


class PushHandler:
    """`peers`: how a push that names a route is passed on (forward.py); by default, with no
    credentials, waiting for a hop's answer up to `idle_timeout_s` per hop. `own`: this
    replica's address, which a route must not name."""

    def __init__(
        self,
        applier: PushApplier,
        idle_timeout_s: float,
        peers: PeerAccess | None = None,
        own: OwnAddress | None = None,
    ) -> None:
        self._applier = applier
        self._idle_timeout_s = idle_timeout_s
        self._peers = peers or PeerAccess(answer_timeout_s=idle_timeout_s)
        self._own = own or OwnAddress()

    def handle(self, parts: Iterator[Part | None]) -> PushOutcome:
        """Run one push from its parts (and ticks) to its commit, or raise why not. A push with
        a route is passed on to its next hop as it arrives (forward.py): the local push goes
        exactly as a direct one, and the outcome says what became of it down the route."""
        inbox: Inbox[Part] = Inbox(parts, self._idle_timeout_s)
        header = _header(inbox)
        check_header(header)
        forward.check_route(header)
        for hop in header.route:
            if self._own.names(hop.address):
                raise MalformedPushError(
                    f"the push header's route names this replica itself ({hop.address!r}): "
                    "it would push to itself"
                )
        # Passed on from its first body part on: by then the local checks of the header passed.
        # A resumed push goes on down the route of the push it resumes (its session's forward).
        committed: list[float] = []  # when the commit message was taken
        generation, onward = self._applier.apply_push(
            header, _body(inbox, committed), inbox, lambda h: forward.start(h, self._peers)
        )
        hops = onward.results() if onward is not None else ()
        return PushOutcome(
            header.model_name,
            generation.version,
            generation.digest,
            header.payload_bytes,
            hops,
            time.perf_counter() - committed[0] if committed else 0.0,
        )


def _header(inbox: Inbox[Part]) -> PushHeader:
    """The push header, which must be the first part."""
    try:
        first = next(inbox, None)
    except SenderGone:
        raise MalformedPushError("the sender cancelled the push before its header") from None
    if first is None:
        raise MalformedPushError("empty push stream: the first message must be a PushHeader")
    if not isinstance(first, PushHeader):
        raise MalformedPushError(f"the first message of a push must be a header, not {kind(first)}")
    return first


def _body(inbox: Inbox[Part], committed: list[float]) -> Iterator[Data | Commit]:
    """Payload data, then the commit, which must be the last part (when it was taken is
    appended to `committed`)."""
    received = 0
    try:
        for part in inbox:
            if isinstance(part, bytes | memoryview):
                received += len(part)
                yield part
            elif isinstance(part, Commit):
                committed.append(time.perf_counter())
                if _more(inbox):
                    raise MalformedPushError("messages follow the commit; it must come last")
                yield part
                return
            else:
                raise MalformedPushError(f"unexpected {kind(part)} message inside a push")
    except SenderGone:
        raise PushBrokenError(
            f"the sender cancelled the push after {received} payload bytes"
        ) from None


def _more(inbox: Inbox[Part]) -> bool:
    """Whether anything follows: a part, or a message no part could be made of."""
    try:
        return next(inbox, None) is not None
    except MalformedPushError:
        return True
