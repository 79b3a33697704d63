"""Passing a push on down its route: the chain a trainer feeds its replicas through.

A push whose header carries a route is passed on by the replica that receives it: it opens a
push to the route's first hop, whose header carries the rest of the route and the writer epoch
the trainer holds on that hop (version, base version, writer and payload size unchanged), and
hands it each payload chunk as it arrives, then the commit, while it applies the push itself
exactly as a direct one (handler.py). The payload bytes go on as they came, never decoded. The
hop checks and commits on its own, and forwards further; its answer, and those of the hops after
it, come back in its PushResponse and go upstream with this replica's own outcome.

Forwarding holds the local push back by a bound at most (the forward stall timeout, 1 s by
default): messages wait for the hop in a small queue, so a slow hop slows the chain and memory
does not grow; a hop that takes nothing for that long is cut and reported stalled
(DEADLINE_EXCEEDED). At the link rates targeted (1 Gbit/s and up) a live hop takes the queue's
few MiB in tens of milliseconds, so one that takes nothing for a second is dark or dead. A hop
that has not answered the push idle timeout per hop left on the route (each waits for the ones
after it) after the local commit is reported stalled too. A hop that refuses, cannot be
reached or goes away is reported with its status; the local push goes on. The channel to a
hop is closed off the push's path: closing one to a hop whose link went dark waits until TCP
gives it up (about 20 s), which would hold up this replica's answer and so the whole chain.
A local push that fails cancels its forward: the hops after it commit nothing of it.

A replica dials its hop with its own sync plane's credentials: the sync token it requires (if
any), and TLS when its sync plane serves TLS, verifying the name the route gives for the hop.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from inference_service.syncplane.messages import encode_commit, encode_header
from inference_service.syncplane.parts import Commit, Data, HopResult, PushHeader
from shared.errors import ConfigurationError, MalformedPushError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.auth import TlsFiles
from shared.grpc.channel import open_channel
from shared.grpc.errors import error_reason
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES
from shared.weights import wire

logger = logging.getLogger(__name__)

PUSH = "/weightsync.v1.WeightSync/Push"
QUEUED = 8  # messages waiting for a hop (a few MiB): beyond them, the push waits for the hop
TICK_S = 0.05  # how often a wait on the queue looks whether the forward has ended
MAX_HOPS = 256  # the longest route a push may carry


@dataclass(frozen=True)
class PeerAccess:
    """How this replica dials the hops it forwards to: the sync token it requires itself (None:
    none), TLS files (None: plaintext; else verify hops against `tls.ca`, the system's CAs
    without one, presenting `tls.cert` under mutual TLS), how long a hop may take nothing
    (`stall_timeout_s`) and how long, per hop left on the route, it may take to answer after the
    local commit (`answer_timeout_s`)."""

    token: str | None = None
    tls: TlsFiles | None = None
    stall_timeout_s: float = 1.0
    answer_timeout_s: float = 5.0


def check_route(header: PushHeader) -> None:
    """A route names at most MAX_HOPS hops, each with an address, none twice (a hop named
    twice would be pushed the version twice: the second push would end or be refused against
    the first, and its refusal would stand for that hop's outcome)."""
    if len(header.route) > MAX_HOPS:
        raise MalformedPushError(
            f"the push header's route names {len(header.route)} hops; at most {MAX_HOPS} may follow"
        )
    if any(not hop.address for hop in header.route):
        raise MalformedPushError("a hop of the push header's route has no address")
    seen: set[str] = set()
    for hop in header.route:
        if hop.address in seen:
            raise MalformedPushError(f"the push header's route names the hop {hop.address!r} twice")
        seen.add(hop.address)


def start(header: PushHeader, access: PeerAccess) -> Forward | None:
    """The forward of a push to the first hop of its route; None when it has no route."""
    return Forward(header, access) if header.route else None


class Forward:
    """One push passed on to the first hop of its route."""

    def __init__(self, header: PushHeader, access: PeerAccess) -> None:
        assert header.route
        self._hop = header.route[0]
        self._access = access
        self._header = dataclasses.replace(
            header, writer_epoch=self._hop.writer_epoch, route=header.route[1:]
        )
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUED)
        self._ended = threading.Event()
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._failed: HopResult | None = None

    @property
    def address(self) -> str:
        return self._hop.address

    def passing_on(self, body: Iterable[Data | Commit]) -> Iterator[Data | Commit]:
        """`body` as it comes, each part handed to the hop first."""
        for part in body:
            if isinstance(part, Commit):
                self._put(encode_commit(part.digest))
                self._put(None)
            else:
                self._put(wire.encode_data([part]))
            yield part

    def results(self) -> tuple[HopResult, ...]:
        """After the local commit: what became of the push on every hop down the route (the
        hops after one that failed are left out: they were not reached)."""
        try:
            if self._failed is not None:
                return (self._failed,)
            if self._call is None:
                return (self._fail(grpc.StatusCode.UNAVAILABLE, "", "the push was not passed on"),)
            # The hop answers once the hops after it answered (each within the bound).
            wait_s = self._access.answer_timeout_s * (1 + len(self._header.route))
            try:
                response: pb.PushResponse = self._call.result(timeout=wait_s)
            except grpc.FutureTimeoutError:
                self._call.cancel()
                return (self._stalled(f"did not answer {wait_s:g}s after the commit;"),)
            except grpc.RpcError as error:
                return (self._failure(error),)
            return (HopResult(self.address, int(response.version)), *self._downstream(response))
        finally:
            self._close()

    def _downstream(self, response: pb.PushResponse) -> tuple[HopResult, ...]:
        """What the hop reports of the hops after it: only those on the route it was given,
        each once, in the order reported (a hop speaks for no other address, and a long or
        repeated list goes no further upstream)."""
        wanted = {hop.address for hop in self._header.route}
        kept: list[HopResult] = []
        for result in response.hops:
            if result.address in wanted:
                wanted.discard(result.address)
                kept.append(
                    HopResult(
                        result.address, result.version, result.code, result.reason, result.message
                    )
                )
        return tuple(kept)

    def cancel(self) -> None:
        """The local push failed: end the forward, so that no hop commits it."""
        if self._call is not None:
            self._call.cancel()
        self._close()

    def _open(self) -> None:
        access = self._access
        logger.info(
            "model %s version %d: passing the push on to %s (%d more hop(s) after it)",
            self._header.model_name,
            self._header.version,
            self.address,
            len(self._header.route),
        )
        self._channel = open_channel(
            self._hop.address,
            SYNC_MAX_MESSAGE_BYTES,
            token=access.token,
            tls=access.tls,
            server_name=(self._hop.server_name or None) if access.tls is not None else None,
        )
        push = self._channel.stream_unary(
            PUSH, request_serializer=None, response_deserializer=pb.PushResponse.FromString
        )
        self._call = push.future(self._messages())

    def _messages(self) -> Iterator[bytes]:
        yield encode_header(self._header)
        while not self._ended.is_set():
            try:
                message = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def _put(self, message: bytes | None) -> None:
        """Queue `message` for the hop, waiting for room up to the bound."""
        if self._failed is not None:
            return
        if self._call is None:
            try:
                self._open()
            except (ConfigurationError, OSError, ValueError) as error:  # e.g. a TLS file
                self._failed = self._fail(grpc.StatusCode.UNAVAILABLE, "", f"cannot dial: {error}")
                return
        deadline = time.monotonic() + self._access.stall_timeout_s
        while True:
            if self._call.done():
                self._ended.set()
                if self._failed is None:
                    self._failed = self._outcome_of_ended()
                return
            try:
                self._queue.put(message, timeout=TICK_S)
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    self._call.cancel()
                    bound = self._access.stall_timeout_s
                    self._failed = self._stalled(f"took nothing for {bound:g}s;")
                    return

    def _outcome_of_ended(self) -> HopResult:
        """Why a hop's push ended before this replica finished sending it."""
        try:
            response = self._call.result(timeout=0)
        except grpc.RpcError as error:
            return self._failure(error)
        except grpc.FutureCancelledError:
            return self._fail(grpc.StatusCode.CANCELLED, "", "the forward was cancelled")
        return self._fail(
            grpc.StatusCode.INTERNAL,
            "",
            f"answered version {response.version} before the push was sent whole",
        )

    def _failure(self, error: grpc.RpcError) -> HopResult:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else str(error)) or ""
        return self._fail(code, error_reason(error) or "", details)

    def _stalled(self, what: str) -> HopResult:
        return self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "", f"the hop {what} it was cut off")

    def _fail(self, code: grpc.StatusCode, reason: str, message: str) -> HopResult:
        self._ended.set()
        logger.warning(
            "model %s version %d: passing the push on to %s failed: %s: %s",
            self._header.model_name,
            self._header.version,
            self.address,
            code.name,
            message,
        )
        return HopResult(self.address, 0, code.value[0], reason, message)

    def _close(self) -> None:
        self._ended.set()
        channel, self._channel = self._channel, None
        if channel is not None:
            # Closing a channel to a hop whose link went dark waits until TCP gives up on it
            # (gRPC's keepalive timeout, 20 s): never on the push's path, which answers now.
            threading.Thread(target=channel.close, name="forward-close", daemon=True).start()
