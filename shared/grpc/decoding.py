"""Requests that do not parse get INVALID_ARGUMENT, naming the message they should have been.

grpcio parses each request before the handler runs and answers one that does not parse with
UNKNOWN ("Unexpected <class '...DecodeError'>", grpc.aio) or INTERNAL ("Exception deserializing
request!", the thread-pool server), logging a traceback each time. A request that is not the
message it claims to be is bad input like any other, so `new_server` installs the StrictDecoding
interceptor last and `new_aio_server` wraps each handler as it is registered (StrictAioServer):
both take the parsing into the handler, where a failure aborts with INVALID_ARGUMENT. Handlers
that take raw bytes (no deserializer) are left as they are.

The wrapped handlers may also answer with their response already serialized (`bytes`), which
is sent as it is: a handler that must know its answer's size before sending it (the data
plane refuses an answer larger than a message may be) serializes it once, not twice (protobuf's
ByteSize serializes the message, at about 0.35 GB/s here: 3 ms of the event loop for a 1 MiB
answer).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grpc

logger = logging.getLogger(__name__)

Parse = Callable[[bytes], Any]


def refusal(parse: Parse) -> str:
    """What a request that `parse` cannot read is told."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return f"the request is not a valid {name or 'request message'} (it does not parse)"


def _kind(handler: grpc.RpcMethodHandler) -> str:
    streams = ("stream" if handler.request_streaming else "unary") + "_"
    return streams + ("stream" if handler.response_streaming else "unary")


class _Parts(NamedTuple):
    parse: Parse
    kind: str  # the handler's attribute that holds its behavior
    inner: Callable[..., Any]  # that behavior
    message: str  # what a request that does not parse is told


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """`serialize`, except that a response a handler serialized itself is sent as it is."""
    if serialize is None:
        return None

    def serialized(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serialized


def _wrapped(handler: grpc.RpcMethodHandler, kind: str, behavior: Any) -> grpc.RpcMethodHandler:
    """`handler` taking raw requests into `behavior`, answers serialized or not."""
    return handler._replace(
        request_deserializer=None,
        response_serializer=_passing_bytes(handler.response_serializer),
        **{kind: behavior},
    )


def _parts(handler: grpc.RpcMethodHandler) -> _Parts | None:
    """What a wrapper needs of `handler`; None where it takes raw bytes."""
    parse = handler.request_deserializer
    if parse is None:
        return None
    kind = _kind(handler)
    return _Parts(parse, kind, getattr(handler, kind), refusal(parse))


def strict(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` of `method` (thread-pool server) with its request parsing moved inside it."""
    parts = _parts(handler)
    if parts is None:
        return handler
    parse, kind, inner, message = parts

    def parsed(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception:
            logger.info("%s -> INVALID_ARGUMENT: %s", method, message)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def each(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        for raw in raws:
            yield parsed(raw, context)

    def behavior(argument: Any, context: grpc.ServicerContext) -> Any:
        if handler.request_streaming:
            return inner(each(argument, context), context)
        return inner(parsed(argument, context), context)

    return _wrapped(handler, kind, behavior)


def strict_async(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` of `method` (grpc.aio server) with its request parsing moved inside it. A
    handler that is neither a coroutine nor an async generator (grpc.aio runs those on an
    executor) and one that reads with `context.read()` keep grpcio's parsing."""
    parts = _parts(handler)
    if parts is None:
        return handler
    parse, kind, inner, message = parts

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception:
            logger.info("%s -> INVALID_ARGUMENT: %s", method, message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def each(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        async for raw in raws:
            yield await parsed(raw, context)

    async def argument_of(argument: Any, context: grpc.aio.ServicerContext) -> Any:
        if handler.request_streaming:
            return each(argument, context)
        return await parsed(argument, context)

    if inspect.iscoroutinefunction(inner) and not handler.request_streaming:

        async def call(argument: Any, context: grpc.aio.ServicerContext) -> Any:
            # parsed inline: each call of a unary method pays no coroutine of its own for it
            try:
                request = parse(argument)
            except Exception:
                logger.info("%s -> INVALID_ARGUMENT: %s", method, message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            return await inner(request, context)

        behavior: Callable[..., Any] = call
    elif inspect.iscoroutinefunction(inner):

        async def call_streaming(argument: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await argument_of(argument, context), context)

        behavior = call_streaming
    elif inspect.isasyncgenfunction(inner):

        async def generate(argument: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in inner(await argument_of(argument, context), context):
                yield response

        behavior = generate
    else:
        return handler
    return _wrapped(handler, kind, behavior)


class _Once:
    """Wraps each handler once: grpcio hands the same handler object for every call of a
    method, so the wrapping costs one dictionary lookup per call."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._wrap = wrap
        self._done: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    def __call__(
        self, handler: grpc.RpcMethodHandler | None, method: str
    ) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        wrapped = self._done.get(handler)
        if wrapped is None:
            wrapped = self._done.setdefault(handler, self._wrap(handler, method))
        return wrapped


class StrictDecoding(grpc.ServerInterceptor):  # type: ignore[misc]
    """Installs `strict` on every handler of a thread-pool server."""

    def __init__(self) -> None:
        self._strict = _Once(strict)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        return self._strict(continuation(details), details.method)


class _StrictHandlers(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose method handlers parse their requests as `strict_async` does."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: _Once) -> None:
        self._inner = inner
        self._wrap = wrap

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._wrap(self._inner.service(details), details.method)


class StrictAioServer(grpc.aio.Server):  # type: ignore[misc]
    """A grpc.aio server whose handlers get `strict_async` as they are registered.

    Not an interceptor: grpc.aio runs a server's interceptors as a chain of coroutines on every
    call, which the data plane's event loop would pay for each request; here a call finds its
    wrapped handler with one dictionary lookup more."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self._strict = _Once(strict_async)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(
            [_StrictHandlers(handler, self._strict) for handler in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {
                name: strict_async(handler, f"/{service_name}/{name}")
                for name, handler in method_handlers.items()
            },
        )

    def add_insecure_port(self, address: str) -> int:
        return int(self._server.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return int(self._server.add_secure_port(address, server_credentials))

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self._server.wait_for_termination(timeout))
