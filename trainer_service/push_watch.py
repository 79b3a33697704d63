"""How the trainer watches a push in flight: its stream (Watched: how long the transport has held
a message without asking for the next, which is how a receiver that reads nothing shows while
the push is still leaving) and, once the whole push has left, the receiver (AppliedWatch: what it
says it applied of the push). A push of a few MiB fits in the transport's buffers and leaves
whole at once, read or not, so a service stuck on it (answering pings, its handlers stuck)
would otherwise hold the sync to the push deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc

from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import error_details


class Watched(Iterator[bytes]):
    """A push's messages as the transport takes them, and how long it has held the last one
    without asking for the next: gRPC asks once it has sent one, so a message held long is one
    the stream does not take (flow control: the other end reads nothing). The time spent making
    a message does not count."""

    def __init__(self, messages: Iterator[bytes]) -> None:
        self._messages = messages
        self._held_since: float | None = None  # None: being asked for one, or all were taken
        self._left_at: float | None = None  # when the last message was taken
        self._lock = threading.Lock()

    def __next__(self) -> bytes:
        with self._lock:
            self._held_since = None
        try:
            message = next(self._messages)
        except StopIteration:
            with self._lock:
                self._left_at = time.monotonic()
            raise
        with self._lock:
            self._held_since = time.monotonic()
        return message

    def held_s(self) -> float:
        """How long the transport has held the last message without asking for the next."""
        with self._lock:
            held = self._held_since
        return 0.0 if held is None else time.monotonic() - held

    def left_s(self) -> float | None:
        """How long ago the whole push had left (the transport took its last message); None
        while it has not."""
        with self._lock:
            left = self._left_at
        return None if left is None else time.monotonic() - left


class AppliedWatch:
    """Once a push has left whole and its answer has not come for `bound_s`, asks the service
    what it applied of it (`get_model`, its GetModel, within `bound_s`) every `bound_s`, until
    it has applied it whole or serves its version (then it commits, and waits for the hops
    after it, each watched by the one before it). `stuck` says why a service that applied
    nothing more between two looks, or did not answer one, is stuck; a look it refuses for its
    limit of calls (RESOURCE_EXHAUSTED) says nothing, and the next is made as planned."""

    def __init__(
        self,
        header: pb.PushHeader,
        get_model: Callable[[float], pb.ModelState],
        bound_s: float,
    ) -> None:
        self._header = header
        self._get_model = get_model
        self._bound_s = bound_s
        self._look_at = 0.0
        self._applied: int | None = None  # at the last look
        self._done = False

    def stuck(self, left_s: float) -> tuple[grpc.StatusCode, str] | None:
        """How and why the service is stuck on the push, which left whole `left_s` ago (UNAVAILABLE
        where its look says it is gone: its sync relay's word that the service behind it
        stopped), or None."""
        if self._done or left_s < self._bound_s or time.monotonic() < self._look_at:
            return None
        bound, h = self._bound_s, self._header
        self._look_at = time.monotonic() + bound  # the next look, from when this one began
        try:
            state = self._get_model(bound)
        except grpc.RpcError as error:
            if hasattr(error, "code") and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None  # it answers, asking to be asked later: alive, only busy
            said = error_details(error, pb.DESCRIPTOR.services_by_name["WeightSync"].full_name)
            gone = hasattr(error, "code") and error.code() is grpc.StatusCode.UNAVAILABLE
            code = grpc.StatusCode.UNAVAILABLE if gone else grpc.StatusCode.DEADLINE_EXCEEDED
            return code, f"the service did not say what it applied of the push ({said})"
        applied = protocol.bytes_applied(
            state, h.model_name, h.version, h.base_version, h.writer_id, h.payload_bytes
        )
        if state.model_name == h.model_name and (
            state.version >= h.version or applied >= h.payload_bytes
        ):
            self._done = True
            return None
        if self._applied is not None and applied <= self._applied:
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the service applied nothing more of the push for {bound:g}s (it is stuck)",
            )
        self._applied = applied
        return None
