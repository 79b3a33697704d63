"""Ending calls that wait on their caller too long, from outside their handlers.

A call on a thread-pool server holds a pool thread, and a call slot (shared/grpc/limits.py),
until its handler returns. A caller that opens a call and sends nothing (a hung process, a
half-open connection that still answers pings, a client that opened a stream and forgot it,
or one that does so on purpose), or never reads what the server sends (the send then waits on
HTTP/2 flow control), would hold them for ever, and enough such calls would lock every other
caller out. So a call watched here that waits on its caller for `timeout_s` is ended with
DEADLINE_EXCEEDED and a message saying why.

The call's thread is blocked inside grpcio then (its request iterator, or its send), so the call
is ended from a watcher thread, by cancelling it with that status (`end_call`): grpcio's
synchronous API cannot end a call from outside its handler otherwise, and reading every
message through a thread of its own would hold a second message per call and add a hand-off to
every message. Nothing is done per message but noting the time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

logger = logging.getLogger(__name__)

# The watcher looks at the calls this often at most (and four times per bound at least).
MAX_LOOK_S = 1.0

T = TypeVar("T")


class WatchedCall:
    """One call as the watcher sees it: since when it waits on its caller (None while the
    server works on it)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.waiting_since: float | None = None
        self.ended = False

    def reading(self, requests: Iterable[T]) -> Iterator[T]:
        """The call's messages, each wait for one watched."""
        messages = iter(requests)
        while True:
            self.waiting_since = time.monotonic()
            try:
                message = next(messages)
            except StopIteration:
                return
            finally:
                self.waiting_since = None
            yield message

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Watch the wait for room to send (the caller reads what it is sent)."""
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.waiting_since = None


class IdleCalls:
    """Ends the calls that wait on their caller for `timeout_s`, the caller getting `message`
    (a watcher thread of its own, started with the first call; `plane` names the server in
    the log)."""

    def __init__(self, timeout_s: float, message: str, plane: str) -> None:
        self.timeout_s = timeout_s
        self._message = message
        self._plane = plane
        self._calls: set[WatchedCall] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, context: grpc.ServicerContext) -> Iterator[WatchedCall]:
        """Watch one call for as long as its handler runs."""
        call = WatchedCall(context)
        with self._lock:
            self._calls.add(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idle-calls", daemon=True)
                self._thread.start()
        try:
            yield call
        finally:
            with self._lock:
                self._calls.discard(call)

    def _run(self) -> None:
        look = min(MAX_LOOK_S, self.timeout_s / 4)
        while True:
            time.sleep(look)
            now = time.monotonic()
            with self._lock:
                idle = [
                    c
                    for c in self._calls
                    if not c.ended
                    and c.waiting_since is not None
                    and now - c.waiting_since >= self.timeout_s
                ]
            for call in idle:
                call.ended = True
                logger.warning(
                    "%s: a call from %s: %s", self._plane, call.context.peer(), self._message
                )
                end_call(call.context, grpc.StatusCode.DEADLINE_EXCEEDED, self._message)


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from outside its handler, the client getting `code` and `message`; the
    handler's wait raises grpc.RpcError (a read) or ends (a send).

    grpcio's context only cancels a call (CANCELLED, no message); its call object takes the
    status to cancel with. Where a grpcio release lacks it, the call is cancelled plainly."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    cancel = getattr(call, "cancel", None)
    try:
        if cancel is not None:
            cancel(code.value[0], message.encode())
            return
    except TypeError:  # a release whose call takes no status
        pass
    context.cancel()
