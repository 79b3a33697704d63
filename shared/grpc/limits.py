"""How many calls a thread-pool server runs at once, counted after authentication.

grpcio's own `maximum_concurrent_rpcs` counts every call before any interceptor runs, so callers
without a token (health probes, anyone who can reach the port) could fill the one budget and
leave none for the writers who hold it. Here the budget is split, and applied after the
authentication interceptor: a call that it refused is answered at once and counts against
nothing; a health check, open to everyone, takes one of a few slots of its own, and a health
Watch stream one of a few others (streams held open leave the checks their room); a lookup (a
method the server names as telling what it holds without waiting on a writer: GetModel,
ListVersions, ListBuffers) one
of a few others, so that a plane whose long calls fill their slots still says what it holds;
every other call one of the writers' slots. A call beyond its budget gets RESOURCE_EXHAUSTED.

Each call admitted holds a pool thread until it ends, and long-lived health Watch streams do too,
so the pool has a thread for every slot and a few spare ones to answer refusals. Handlers are
run request-streaming (a unary handler gets the one request from the stream): grpcio would
otherwise hold a thread waiting for a unary request before any handler ran, uncounted, for as
long as the caller chooses to send nothing. Counted, such a call would still hold its slot that
long, so a call that sends no request within REQUEST_WAIT_S is ended (DEADLINE_EXCEEDED,
shared/grpc/idle.py); a request arrives with the call's headers from any client that means it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from shared.grpc.auth import OPEN_METHODS
from shared.grpc.idle import IdleCalls

HEALTH_CALLS = 4  # health checks at once; probes need few
WATCH_CALLS = 4  # health Watch streams at once
LOOKUP_CALLS = 4  # lookups at once, where a server names some
SPARE_THREADS = 2  # pool threads beyond the slots, to answer the calls refused
WATCH_METHOD = "/grpc.health.v1.Health/Watch"
REQUEST_WAIT_S = 10.0  # how long a unary call may hold its slot before its request arrives


@dataclass(frozen=True)
class CallBudget:
    """Calls a server runs at once: `calls` of its own methods (after authentication),
    `health` health checks, WATCH_CALLS health Watch streams, and LOOKUP_CALLS of the
    `lookups` (full method names) where there are any; `plane` names the server in
    refusals."""

    calls: int
    plane: str
    health: int = HEALTH_CALLS
    lookups: frozenset[str] = frozenset()

    @property
    def lookup_calls(self) -> int:
        return LOOKUP_CALLS if self.lookups else 0

    @property
    def threads(self) -> int:
        """Pool threads the budget needs: one per slot, and spare ones."""
        return self.calls + self.health + WATCH_CALLS + self.lookup_calls + SPARE_THREADS


class CallLimiter(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admits calls within a `CallBudget`; install it after the authentication interceptor."""

    def __init__(self, budget: CallBudget) -> None:
        self._calls = threading.BoundedSemaphore(budget.calls)
        self._health = threading.BoundedSemaphore(budget.health)
        self._watches = threading.BoundedSemaphore(WATCH_CALLS)
        self._lookups = threading.BoundedSemaphore(max(budget.lookup_calls, 1))
        self._lookup_methods = budget.lookups
        self._quiet = IdleCalls(
            REQUEST_WAIT_S,
            f"the call sent no request within {REQUEST_WAIT_S:g}s: the {budget.plane} ended it "
            "to free its slot",
            budget.plane,
        )
        self._calls_full = f"the {budget.plane} is at its limit of {budget.calls} calls at once"
        self._health_full = (
            f"the {budget.plane} is at its limit of {budget.health} health calls at once"
        )
        self._watches_full = (
            f"the {budget.plane} is at its limit of {WATCH_CALLS} health Watch streams at once"
        )
        self._lookups_full = (
            f"the {budget.plane} is at its limit of {budget.lookup_calls} lookups at once"
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        if details.method == WATCH_METHOD:
            return _admitted(handler, self._watches, self._watches_full, self._quiet)
        if details.method.startswith(OPEN_METHODS):
            return _admitted(handler, self._health, self._health_full, self._quiet)
        if details.method in self._lookup_methods:
            return _admitted(handler, self._lookups, self._lookups_full, self._quiet)
        return _admitted(handler, self._calls, self._calls_full, self._quiet)


def _admitted(
    handler: grpc.RpcMethodHandler, slots: threading.BoundedSemaphore, full: str, quiet: IdleCalls
) -> grpc.RpcMethodHandler:
    """`handler` made request-streaming, run only while it holds one of `slots`; a unary
    request is waited for only as long as `quiet` allows."""
    kind = ("stream" if handler.request_streaming else "unary") + "_"
    kind += "stream" if handler.response_streaming else "unary"
    inner = getattr(handler, kind)

    def argument(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        if handler.request_streaming:
            return requests
        try:
            with quiet.watch(context) as call:
                for request in call.reading(requests):
                    return request
        except grpc.RpcError:  # ended by `quiet`, or the caller went away
            context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended before its request")

    def take(context: grpc.ServicerContext) -> None:
        if not slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{full}; retry later")

    if handler.response_streaming:

        def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            take(context)
            try:
                yield from inner(argument(requests, context), context)
            finally:
                slots.release()

        return grpc.stream_stream_rpc_method_handler(
            streaming, handler.request_deserializer, handler.response_serializer
        )

    def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        take(context)
        try:
            return inner(argument(requests, context), context)
        finally:
            slots.release()

    return grpc.stream_unary_rpc_method_handler(
        unary, handler.request_deserializer, handler.response_serializer
    )
