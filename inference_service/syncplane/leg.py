"""The push to one hop of a forward (forward.py): its header, the messages waiting for the hop in
a small queue (QUEUED), the call, and what became of it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from inference_service.syncplane.messages import encode_header
from inference_service.syncplane.parts import Hop, HopResult, PushHeader
from shared import protocol
from shared.errors import ConfigurationError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.channel import close_watched, open_channel
from shared.grpc.errors import bounded, error_details, error_reason
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES, watched_link

if TYPE_CHECKING:
    from inference_service.syncplane.forward import PeerAccess

logger = logging.getLogger("inference_service.syncplane.forward")  # its lines are the forward's

PUSH = "/weightsync.v1.WeightSync/Push"
GET_MODEL = "/weightsync.v1.WeightSync/GetModel"
QUEUED = 8  # messages waiting for a hop (a few MiB): beyond them, the push waits for the hop
TICK_S = 0.05  # how often a wait on the queue looks whether the forward has ended
# A hop whose channel is not connected this long after it was dialled (or the stall bound, if
# longer) cannot be reached: gRPC itself gives up on a peer that accepts TCP and never speaks
# HTTP/2 only after its own connect timeout, tens of seconds, and a push small enough for the
# queue and the transport's buffers would wait that long for the answer.
REACH_S = 2.0
MAX_REASON_BYTES = 128  # a hop's error-reason passed upstream (reasons are short names)
BUSY = -1  # a look at what a hop applied that it asked to make later (_progress)


class Leg:
    """The push to one hop: its header, the messages waiting for it, the call."""

    def __init__(
        self, hop: Hop, header: PushHeader, access: PeerAccess, abandoned: threading.Event
    ) -> None:
        self.hop = hop
        self.header = header
        self._access = access
        self._abandoned = abandoned
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUED)
        self._ended = threading.Event()
        self._call_done = threading.Event()  # set by the call's done callback: no lock to ask
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._input_done = False
        self._reached = threading.Event()  # its channel was connected once: a later loss is a cut
        self._reach_by = float("inf")  # when dialled: the time by which it must be connected

    @property
    def address(self) -> str:
        return self.hop.address

    def dial(self) -> HopResult | None:
        """Open the channel to the hop, watched by its transport within the stall bound (a
        link gone dark fails the call UNAVAILABLE); the failure if it cannot be (e.g. a TLS
        file)."""
        access = self._access
        try:
            self._channel = open_channel(
                self.hop.address,
                SYNC_MAX_MESSAGE_BYTES,
                token=access.token,
                tls=access.tls,
                server_name=(self.hop.server_name or None) if access.tls is not None else None,
                options=watched_link(access.stall_timeout_s),
            )
        except (ConfigurationError, OSError, ValueError) as error:
            return self.fail(grpc.StatusCode.UNAVAILABLE, "", f"cannot dial: {error}")
        self._reach_by = time.monotonic() + self._reach_s
        self._channel.subscribe(self._on_connectivity)
        return None

    @property
    def _reach_s(self) -> float:
        return max(REACH_S, self._access.stall_timeout_s)

    def _unreached(self, now: bool = False) -> HopResult | None:
        """The failure of a hop not connected in time, or by `now` (as gRPC's own, UNAVAILABLE
        with no reason: not reached at all, so the trainer asks it itself), or None."""
        if self._reached.is_set() or (not now and time.monotonic() < self._reach_by):
            return None
        if self._call is not None:
            self._call.cancel()
        return self.fail(grpc.StatusCode.UNAVAILABLE, "", "not connected since it was dialled")

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._reached.set()

    def held(self, timeout_s: float | None = None) -> pb.ModelState:
        """The hop's GetModel of the push's model, within `timeout_s` (the stall bound)."""
        assert self._channel is not None
        get = self._channel.unary_unary(
            GET_MODEL,
            request_serializer=pb.GetModelRequest.SerializeToString,
            response_deserializer=pb.ModelState.FromString,
        )
        request = pb.GetModelRequest(model_name=self.header.model_name)
        call: Any = get.future(request, timeout=timeout_s or self._access.stall_timeout_s)
        answered = threading.Event()  # waited on, not polled: the hops after wait on this
        call.add_done_callback(lambda _: answered.set())
        while not answered.wait(TICK_S):
            if self._abandoned.is_set():
                call.cancel()  # the push is being ended: its result raises CANCELLED
                break
        state: pb.ModelState = call.result()
        return state

    def start(self, past: str = "") -> None:
        """Open the push; `past` says which hop it routes past, for the log."""
        assert self._channel is not None
        h = self.header
        if past:
            logger.info(
                "model %s version %d: %sresuming the push on %s from byte %d (%d more hop(s) "
                "after it)",
                h.model_name,
                h.version,
                past,
                self.address,
                h.resume_from,
                len(h.route),
            )
        else:
            logger.info(
                "model %s version %d: passing the push on to %s (%d more hop(s) after it)",
                h.model_name,
                h.version,
                self.address,
                len(h.route),
            )
        push = self._channel.stream_unary(
            PUSH, request_serializer=None, response_deserializer=pb.PushResponse.FromString
        )
        self._call = push.future(self._messages())
        self._call.add_done_callback(lambda _: self._call_done.set())

    def _messages(self) -> Iterator[bytes]:
        yield encode_header(self.header)
        while not self._ended.is_set():
            try:
                message = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def put(self, message: bytes | None) -> HopResult | None:
        """Queue `message` for the hop (None: the end), waiting for room up to the bound; the
        failure that ended the push to it, if it did."""
        if self._input_done:
            return None
        deadline = time.monotonic() + self._access.stall_timeout_s
        while True:
            if self._abandoned.is_set() and not self._call_done.is_set():
                self._call.cancel()
            if self._call_done.is_set():
                self._ended.set()
                return self._outcome_of_ended()
            try:
                self._queue.put(message, timeout=TICK_S)
                self._input_done = message is None
                return None
            except queue.Full:
                if time.monotonic() >= deadline:
                    if (unreached := self._unreached(now=True)) is not None:
                        return unreached  # it took nothing because it was never reached
                    self._call.cancel()
                    bound = self._access.stall_timeout_s
                    return self._stalled(f"took nothing for {bound:g}s;")

    def held_bytes(self, state: pb.ModelState) -> int:
        """The payload bytes `state`'s pending push applied of this push (0: none of it)."""
        h = self.header
        return protocol.bytes_applied(
            state, h.model_name, h.version, h.base_version, h.writer_id, h.payload_bytes
        )

    def result(self, wait_s: float) -> tuple[HopResult, ...]:
        """The hop's answer, and its hops' (committed), or its failure alone. A hop that has
        not answered by the stall bound is watched, once reached, while it has not taken the
        push whole (`_progress`): one that stops applying it is cut, one that goes on (held to
        a rate limit, say) is waited for. Once it has taken it whole (or where it cannot be
        watched) it has `wait_s` to answer."""
        now = time.monotonic()
        deadline = now + wait_s
        look_at = now + self._access.stall_timeout_s
        applied: int | None = None  # the payload bytes it applied at the last look
        while not self._call_done.wait(TICK_S):
            if (unreached := self._unreached()) is not None:
                return (unreached,)
            now = time.monotonic()
            if now >= deadline:
                self._call.cancel()
                return (self._stalled(f"did not answer {wait_s:g}s after the commit;"),)
            if now >= look_at and self._reached.is_set() and not self._call_done.is_set():
                look = self._progress(applied)
                if isinstance(look, HopResult):
                    return (look,)
                if look is None:  # whole: its answer is due within the bound from now
                    deadline, look_at = time.monotonic() + wait_s, float("inf")
                    continue
                look_at = now + self._access.answer_timeout_s  # from when this look began
                if look != BUSY:
                    if applied is None or look > applied:  # going on: judged at the next look
                        deadline = max(deadline, look_at + wait_s)
                    applied = look
        try:
            response: pb.PushResponse = self._call.result(timeout=0)
        except grpc.FutureCancelledError:
            return (self.fail(grpc.StatusCode.CANCELLED, "", "the forward was cancelled"),)
        except grpc.RpcError as error:
            return (self.failure(error),)
        return (HopResult(self.address, int(response.version)), *self._downstream(response))

    def _progress(self, before: int | None) -> int | HopResult | None:
        """What the hop applied of the push (its GetModel), when it has not taken it whole yet;
        None once it has (it commits, then waits for the hops after it: their own bounds hold
        them); BUSY when it asks to be asked later (its sync plane at its limit of calls); or
        the failure of a hop that applied nothing more since `before` (a look one answer bound
        ago) or cannot say within that bound. A hop stuck on a push small enough for its
        transport's buffers takes all the messages it is sent and never answers: without this
        look, the replica before it would wait out the answer bound of every hop after it."""
        bound = self._access.answer_timeout_s
        try:
            state = self.held(bound)
        except grpc.FutureCancelledError:
            return None  # the forward is being ended: its call is cancelled too
        except grpc.RpcError as error:
            if self._call_done.is_set():
                return None  # it answered meanwhile (or its link broke): that outcome stands
            if hasattr(error, "code") and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                return BUSY  # it answers: alive, only busy
            self._call.cancel()
            # Its sync relay's word that the service behind it stopped stays UNAVAILABLE.
            lost = hasattr(error, "code") and error.code() is grpc.StatusCode.UNAVAILABLE
            said = error_details(error, pb.DESCRIPTOR.services_by_name["WeightSync"].full_name)
            return self.fail(
                grpc.StatusCode.UNAVAILABLE if lost else grpc.StatusCode.DEADLINE_EXCEEDED,
                protocol.PUSH_STALLED,
                f"the hop did not say what it applied of the push ({said}); it was cut off",
            )
        applied = self.held_bytes(state)
        mine = state.model_name == self.header.model_name
        if mine and (state.version >= self.header.version or applied >= self.header.payload_bytes):
            return None
        if before is not None and applied <= before and not self._call_done.is_set():
            self._call.cancel()
            return self._stalled(f"applied nothing more of the push for {bound:g}s;")
        return applied

    def _downstream(self, response: pb.PushResponse) -> tuple[HopResult, ...]:
        """What the hop reports of the hops after it: only those on the route it was given,
        each once, in the order reported (a hop speaks for no other address, and a long or
        repeated list goes no further upstream)."""
        wanted = {hop.address for hop in self.header.route}
        kept: list[HopResult] = []
        for result in response.hops:
            if result.address in wanted:
                wanted.discard(result.address)
                kept.append(
                    HopResult(
                        result.address,
                        result.version,
                        result.code,
                        bounded(result.reason, MAX_REASON_BYTES),
                        bounded(result.message),
                    )
                )
        return tuple(kept)

    def _outcome_of_ended(self) -> HopResult:
        """Why a hop's push ended before this replica finished sending it."""
        try:
            response = self._call.result(timeout=0)
        except grpc.RpcError as error:
            return self.failure(error)
        except grpc.FutureCancelledError:
            return self.fail(grpc.StatusCode.CANCELLED, "", "the forward was cancelled")
        return self.fail(
            grpc.StatusCode.INTERNAL,
            "",
            f"answered version {response.version} before the push was sent whole",
        )

    def failure(self, error: grpc.RpcError) -> HopResult:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error_details(error, pb.DESCRIPTOR.services_by_name["WeightSync"].full_name)
        reason = error_reason(error) or ""
        if code is grpc.StatusCode.UNAVAILABLE and not reason and self._reached.is_set():
            # The transport lost a hop it had reached (its link went dark, its process
            # stopped): cut mid-push, like one that took nothing in time.
            return self.fail(code, protocol.PUSH_STALLED, f"{details}; its link was lost")
        return self.fail(code, reason, details)

    def _stalled(self, what: str) -> HopResult:
        # Tagged push-stalled, as a hop whose link was lost (`failure`): the trainer lags such a
        # hop at once (trainer_service/chain.py), where one that could not be reached at all is
        # asked again by the trainer.
        return self.fail(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            protocol.PUSH_STALLED,
            f"the hop {what} it was cut off",
        )

    def fail(self, code: grpc.StatusCode, reason: str, message: str) -> HopResult:
        self._ended.set()
        logger.warning(
            "model %s version %d: passing the push on to %s failed: %s: %s",
            self.header.model_name,
            self.header.version,
            self.address,
            code.name,
            message,
        )
        return HopResult(
            self.address, 0, code.value[0], bounded(reason, MAX_REASON_BYTES), bounded(message)
        )

    def abort(self) -> None:
        """From any thread: end the push to the hop (its channel stays, for its owner)."""
        self._ended.set()
        if self._call is not None:
            self._call.cancel()

    def cancel(self) -> None:
        """End the push to the hop (if it is still going) and close its channel, off the
        push's path: closing a channel to a hop whose link went dark waits until the link's
        keepalive gives up on it (`watched_link`'s timeout)."""
        self._ended.set()
        if self._call is not None and not self._call.done():
            self._call.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            threading.Thread(
                target=close_watched,
                args=(channel, self._on_connectivity),
                name="forward-close",
                daemon=True,
            ).start()
