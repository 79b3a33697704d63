"""Passing a push on down its route: the chain a trainer feeds its replicas through.

A push whose header carries a route is passed on by the replica that receives it: it opens a
push to the route's first hop, whose header carries the rest of the route and the writer epoch
the trainer holds on that hop (version, base version, writer and payload size unchanged), and
hands it each payload chunk as it arrives, then the commit, while it applies the push itself
exactly as a direct one (resume.py). The payload bytes go on as they came, never decoded. The
hop checks and commits on its own, and forwards further; its answer, and those of the hops after
it, come back in its PushResponse and go upstream with this replica's own outcome.

Forwarding holds the local push back by a bound at most (the forward stall timeout, 0.5 s by
default): messages wait for the hop in a small queue, so a slow hop slows the chain and memory
does not grow; a hop that takes nothing for that long is cut and reported stalled
(DEADLINE_EXCEEDED). The connection to the hop is watched by its transport too (leg.py): a hop
whose link went dark, answering no ping and acknowledging no byte for half the bound, is cut
sooner (UNAVAILABLE). At the link rates targeted (1 Gbit/s and up) a live hop takes the queue's
few MiB in tens of milliseconds, so one that takes nothing for half a second is dark or dead.
The bound is what a cut costs the hops after it (routed past at once, they get only the rest),
so it is kept well under a push's time at those rates (about 1.1 s for 128 MiB at 1 Gbit/s).
Once the whole push has left (a small one leaves at once, into the transport's buffers, read or
not), a hop that has not answered within the bound is asked what it applied (leg.py): one that
applied nothing more for the push idle timeout, or cannot say within it, is reported stalled;
one that took the push whole is reported stalled once it has not answered the push idle
timeout per hop left on the route (each waits for the ones after it) after the local commit.
A hop that refuses is reported with its status and routed past like a cut one; the local push
goes on. The channel to a hop is closed off the push's path: closing one to a hop whose link
went dark waits until the link's keepalive gives it up (`--forward-stall-timeout-s`-derived,
about a second by default; gRPC's own default is 20 s), which would hold up this replica's
answer and so the whole chain.
A local push that fails cancels its forward: the hops after it commit nothing of it.

Routing past a failed hop. A hop cut off (stalled, DEADLINE_EXCEEDED), unreachable (UNAVAILABLE:
it cannot be dialled, or its connection broke) or refusing (it restarted without its state, or
it is fenced, say) with hops after it on the route is reported so, and this replica goes on
with the next hop itself (each hop's outcome is its own): it asks that hop's GetModel what it
holds of the push (the hop was fed through the failed one: `pending` names the version and the
payload bytes it applied), and resumes the push there (`resume_from`, resume.py), replaying
from a window of the data messages it passed on last (`replay_bytes`, the forward replay window;
only the window is kept). A hop that holds nothing of it gets the push from its start, if the window
still holds the start. A hop that already serves the version with the commit's digest is
reported committed and routed past in turn. A hop that fails too is routed past the same way,
at most once per hop of the route. A hop whose offset the window no longer holds is left out
of the results (not reached, as are the hops after it): the trainer pushes them again.

A replica dials its hop with its own sync plane's credentials: the sync token it requires (if
any), and TLS when its sync plane serves TLS, verifying the name the route gives for the hop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from inference_service.syncplane.leg import Leg
from inference_service.syncplane.messages import encode_commit
from inference_service.syncplane.own import address_problem, endpoints
from inference_service.syncplane.parts import Commit, Data, Hop, HopResult, PushHeader
from shared import protocol
from shared.errors import MalformedPushError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.auth import TlsFiles
from shared.weights import wire

logger = logging.getLogger(__name__)

MAX_HOPS = protocol.MAX_ROUTE_HOPS  # the longest route a push may carry


@dataclass(frozen=True)
class PeerAccess:
    """How this replica dials the hops it forwards to: the sync token it requires itself (None:
    none), TLS files (None: plaintext; else verify hops against `tls.ca`, the system's CAs
    without one, presenting `tls.cert` under mutual TLS), how long a hop may take nothing
    (`stall_timeout_s`), how long, per hop left on the route, it may take to answer after the
    local commit (`answer_timeout_s`), and how many bytes of data messages passed on are kept to
    resume the hop after a cut one (`replay_bytes`; 0: none, a cut hop's successors are left to
    the trainer)."""

    token: str | None = None
    tls: TlsFiles | None = None
    stall_timeout_s: float = 0.5
    answer_timeout_s: float = 5.0
    replay_bytes: int = 64 << 20


def check_route(header: PushHeader) -> None:
    """A route names at most MAX_HOPS hops, each with an address that can be dialled
    (`address_problem`), none twice, under any spelling (own.endpoints: `localhost:P` and
    `127.0.0.1:P` are one hop; a hop named twice would be pushed the version twice: the second
    push would end or be refused against the first, and its refusal would stand for that hop's
    outcome)."""
    if len(header.route) > MAX_HOPS:
        raise MalformedPushError(
            f"the push header's route names {len(header.route)} hops; at most {MAX_HOPS} may follow"
        )
    if any(not hop.address for hop in header.route):
        raise MalformedPushError("a hop of the push header's route has no address")
    for hop in header.route:
        if problem := address_problem(hop.address):
            raise MalformedPushError(f"a hop of the push header's route: {problem}")
    seen: dict[tuple[str, int], str] = {}  # where each hop reaches -> the hop's address
    resolved: dict[str, set[str]] = {}
    for hop in header.route:
        reaches = endpoints(hop.address, resolved)
        if named := next((seen[point] for point in reaches if point in seen), None):
            spelled = "" if named == hop.address else f" (as {named!r} before it)"
            raise MalformedPushError(
                f"the push header's route names the hop {hop.address!r} twice{spelled}"
            )
        seen.update(dict.fromkeys(reaches, hop.address))


def start(header: PushHeader, access: PeerAccess) -> Forward | None:
    """The forward of a push to the first hop of its route; None when it has no route."""
    return Forward(header, access) if header.route else None


class ReplayWindow:
    """The data messages last passed on, by payload offset, up to `limit` bytes in all (the
    newest one is always kept), and the commit once it was passed on."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._messages: deque[tuple[int, bytes]] = deque()  # (payload offset, message)
        self._bytes = 0
        self.end = 0  # payload bytes passed on
        self.commit: bytes | None = None

    def add(self, size: int, message: bytes) -> None:
        """A data message carrying the next `size` payload bytes."""
        if self._limit > 0:
            self._messages.append((self.end, message))
            self._bytes += len(message)
            while self._bytes > self._limit and len(self._messages) > 1:
                self._bytes -= len(self._messages.popleft()[1])
        self.end += size

    def since(self, offset: int) -> list[bytes] | None:
        """The data messages carrying the payload from byte `offset` on (the first one cut to
        start there); None when the window no longer holds `offset`."""
        if offset == self.end:
            return []
        if offset > self.end or not self._messages or offset < self._messages[0][0]:
            return None
        kept = list(self._messages)
        first = max(i for i, (at, _) in enumerate(kept) if at <= offset)
        at, message = kept[first]
        payload = wire.data_payload(message)
        assert payload is not None  # encoded here, by wire.encode_data
        head = [wire.encode_data([payload[offset - at :]])] if offset > at else [message]
        return [*head, *(m for _, m in kept[first + 1 :])]


class Forward:
    """One push passed on down its route: to its first hop, and past each hop that fails."""

    def __init__(self, header: PushHeader, access: PeerAccess) -> None:
        assert header.route
        self._header = header
        self._route = header.route
        self._access = access
        self._window = ReplayWindow(access.replay_bytes)
        self._index = 0  # the hop the push goes to now
        self._leg: Leg | None = None
        self._started = False
        self._passed: list[HopResult] = []  # hops routed past, in route order
        self._failed: HopResult | None = None  # a hop not routed past: the ones after not reached
        self._abandoned = threading.Event()  # the push is being ended: pass nothing more on

    @property
    def address(self) -> str:
        return self._route[0].address

    def passing_on(self, body: Iterable[Data | Commit]) -> Iterator[Data | Commit]:
        """`body` as it comes, each part handed to the hop first."""
        for part in body:
            if isinstance(part, Commit):
                self.send_commit(part.digest)
            else:
                self.send_data(part)
            yield part

    def send_data(self, data: Data) -> None:
        """Hand the hop the next payload bytes."""
        message = wire.data_message(data)
        self._window.add(len(data), message)
        self._send(message)

    def send_commit(self, digest: bytes) -> None:
        """Hand the hop the commit: the push is whole."""
        message = encode_commit(digest)
        self._window.commit = message
        self._send(message)
        self._send(None)

    def _send(self, message: bytes | None) -> None:
        if not self._started:
            self._started = True
            self._open(self._route[0])
        if self._leg is None:
            return
        failure = self._leg.put(message)
        if failure is not None:
            self._route_past(failure)

    def results(self) -> tuple[HopResult, ...]:
        """After the local commit: what became of the push on every hop down the route (the
        hops after one that failed and was not routed past are left out: not reached)."""
        try:
            while True:
                leg = self._leg
                if leg is None:
                    if not self._started:
                        failure = HopResult(
                            self.address,
                            0,
                            grpc.StatusCode.UNAVAILABLE.value[0],
                            "",
                            "the push was not passed on",
                        )
                        return (failure,)
                    failed = (self._failed,) if self._failed is not None else ()
                    return (*self._passed, *failed)
                # The hop answers once the hops after it answered (each within the bound).
                outcome = leg.result(self._access.answer_timeout_s * (1 + len(leg.header.route)))
                if outcome[0].committed:
                    return (*self._passed, *outcome)
                self._route_past(outcome[0])
        finally:
            self.cancel()

    def abandon(self) -> None:
        """From any thread: the push is being ended (another push for the model supersedes
        it): stop passing it on and routing past hops at once, so that the thread feeding it
        lets the model go (it then cancels the forward)."""
        self._abandoned.set()
        leg = self._leg
        if leg is not None:
            leg.abort()

    def cancel(self) -> None:
        """End the forward (the local push failed: no hop commits it)."""
        if self._leg is not None:
            self._leg.cancel()
        self._leg = None
        self._started = True

    def _open(self, hop: Hop) -> None:
        """The push to the route's first hop, from the start (routed past if it cannot be
        dialled)."""
        header = dataclasses.replace(
            self._header, writer_epoch=hop.writer_epoch, route=self._route[1:]
        )
        leg = Leg(hop, header, self._access, self._abandoned)
        failure = leg.dial()
        if failure is not None:
            self._route_past(failure)
            return
        leg.start()
        self._leg = leg

    def _route_past(self, failure: HopResult) -> None:
        """The hop the push went to failed with `failure`: go on with the hops after it
        where the window lets, else stop there."""
        while True:
            if self._leg is not None:
                self._leg.cancel()
                self._leg = None
            last = self._index + 1 >= len(self._route)
            if last or self._abandoned.is_set():
                self._failed = failure
                return
            self._passed.append(failure)
            self._index += 1
            next_failure = self._resume(failure.address, self._route[self._index])
            if next_failure is None:
                return
            failure = next_failure

    def _resume(self, cut: str, hop: Hop) -> HopResult | None:
        """Go on with `hop` past the `cut` one, from what it holds of the push; the failure
        that ends it (None: it is fed, left to the trainer, or committed and passed)."""
        header = self._header
        while True:
            leg = Leg(hop, header, self._access, self._abandoned)
            failure = leg.dial()
            if failure is not None:
                return failure
            try:
                state = leg.held()
            except grpc.RpcError as error:
                leg.cancel()
                return leg.failure(error)
            except grpc.FutureCancelledError:
                leg.cancel()
                return leg.fail(grpc.StatusCode.CANCELLED, "", "the forward was abandoned")
            if self._committed(state):
                leg.cancel()
                self._passed.append(HopResult(hop.address, header.version))
                logger.info(
                    "model %s version %d: routing past %s: %s already committed it",
                    header.model_name,
                    header.version,
                    cut,
                    hop.address,
                )
                if self._index + 1 >= len(self._route):
                    return None
                cut, self._index = hop.address, self._index + 1
                hop = self._route[self._index]
                continue
            held = leg.held_bytes(state)
            messages = self._window.since(held)
            if messages is None:
                leg.cancel()
                logger.warning(
                    "model %s version %d: routing past %s: %s holds %d payload bytes, no longer "
                    "in the replay window (%d bytes passed on): left to the trainer",
                    header.model_name,
                    header.version,
                    cut,
                    hop.address,
                    held,
                    self._window.end,
                )
                return None
            leg.header = dataclasses.replace(
                header,
                writer_epoch=hop.writer_epoch,
                route=self._route[self._index + 1 :],
                resume_from=held,
            )
            leg.start(f"routing past {cut}: ")
            self._leg = leg
            if self._window.commit is not None:
                messages = [*messages, self._window.commit]
            for message in messages:
                failure = leg.put(message)
                if failure is not None:
                    return failure
            if self._window.commit is not None:
                return leg.put(None)
            return None

    def _committed(self, state: pb.ModelState) -> bool:
        """Whether `state` serves this push's version, as its commit says (the whole push left
        this replica: its commit was passed on)."""
        commit = self._window.commit
        if commit is None or state.version != self._header.version:
            return False
        digest: bytes = pb.PushRequest.FromString(commit).commit.digest
        return bool(state.digest == digest)
