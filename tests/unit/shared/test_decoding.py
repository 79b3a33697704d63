"""Requests that do not parse get INVALID_ARGUMENT from both kinds of server, on all four kinds of
method, requests that do parse still reach their handler, and a handler may answer with its
response serialized already."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest

from shared.gen.inference import grpc_service_pb2 as pb
from shared.grpc.server import bind, new_aio_server, new_server

GOOD = pb.ModelInferRequest(id="a").SerializeToString()
GARBAGE = b"\xff\xff\xff\xff"
REFUSAL = "the request is not a valid inference.ModelInferRequest"
SERVICE = "test.Echo"


SERIALIZED = "serialized"  # a request with this id is answered in bytes the handler serialized


def _reply(requests: list[pb.ModelInferRequest]) -> pb.ModelInferResponse | bytes:
    response = pb.ModelInferResponse(id="+".join(r.id for r in requests))
    if requests and requests[0].id == SERIALIZED:
        return bytes(response.SerializeToString())
    return response


def _handlers(
    unary_unary: Callable[..., Any],
    unary_stream: Callable[..., Any],
    stream_unary: Callable[..., Any],
    stream_stream: Callable[..., Any],
) -> grpc.GenericRpcHandler:
    kinds = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    typed = {
        name: handler._replace(
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
        for name, handler in kinds.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, typed)


def _threaded_handlers() -> grpc.GenericRpcHandler:
    def unary_unary(request: pb.ModelInferRequest, context: object) -> Any:
        return _reply([request])

    def unary_stream(request: pb.ModelInferRequest, context: object) -> Iterator[Any]:
        yield _reply([request])
        yield _reply([request])

    def stream_unary(requests: Iterator[pb.ModelInferRequest], context: object) -> Any:
        return _reply(list(requests))

    def stream_stream(requests: Iterator[pb.ModelInferRequest], context: object) -> Iterator[Any]:
        for request in requests:
            yield _reply([request])

    return _handlers(unary_unary, unary_stream, stream_unary, stream_stream)


def _async_handlers() -> grpc.GenericRpcHandler:
    async def unary_unary(request: pb.ModelInferRequest, context: object) -> Any:
        return _reply([request])

    async def unary_stream(request: pb.ModelInferRequest, context: Any) -> None:
        await context.write(_reply([request]))  # the reader-writer style
        await context.write(_reply([request]))

    async def stream_unary(requests: AsyncIterator[pb.ModelInferRequest], context: object) -> Any:
        return _reply([request async for request in requests])

    async def stream_stream(
        requests: AsyncIterator[pb.ModelInferRequest], context: object
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield _reply([request])

    return _handlers(unary_unary, unary_stream, stream_unary, stream_stream)


def _threaded_server() -> Iterator[str]:
    server = new_server(4, 1 << 20)
    server.add_generic_rpc_handlers((_threaded_handlers(),))
    port = bind(server, "127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _async_server() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = new_aio_server(1 << 20)
        server.add_generic_rpc_handlers((_async_handlers(),))
        port = bind(server, "127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(params=["thread-pool", "aio"])
def channel(request: pytest.FixtureRequest) -> Iterator[grpc.Channel]:
    servers = _threaded_server() if request.param == "thread-pool" else _async_server()
    address = next(servers)
    with grpc.insecure_channel(address) as channel:
        yield channel
    next(servers, None)


def _call(channel: grpc.Channel, method: str) -> Callable[[Any], Any]:
    kinds = {
        "UnaryUnary": channel.unary_unary,
        "UnaryStream": channel.unary_stream,
        "StreamUnary": channel.stream_unary,
        "StreamStream": channel.stream_stream,
    }
    call = kinds[method](
        f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
    )

    def invoke(argument: Any) -> list[pb.ModelInferResponse]:
        answer = call(argument, timeout=10)
        answers = [answer] if isinstance(answer, bytes) else list(answer)
        return [pb.ModelInferResponse.FromString(a) for a in answers]

    return invoke


UNARY = ["UnaryUnary", "UnaryStream"]
STREAMING = ["StreamUnary", "StreamStream"]


@pytest.mark.parametrize("method", UNARY)
def test_a_unary_request_that_does_not_parse_is_an_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(channel, method)(GARBAGE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert REFUSAL in (caught.value.details() or "")
    assert {r.id for r in _call(channel, method)(GOOD)} == {"a"}


@pytest.mark.parametrize("method", STREAMING)
def test_a_streamed_request_that_does_not_parse_ends_the_call_as_an_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(channel, method)(iter([GOOD, GARBAGE, GOOD]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert REFUSAL in (caught.value.details() or "")
    assert [r.id for r in _call(channel, method)(iter([GOOD, GOOD]))] in (["a+a"], ["a", "a"])


@pytest.mark.parametrize("method", UNARY + STREAMING)
def test_a_handler_may_answer_with_its_response_serialized_already(
    channel: grpc.Channel, method: str
) -> None:
    request = pb.ModelInferRequest(id=SERIALIZED).SerializeToString()
    argument: Any = request if method in UNARY else iter([request])
    assert {r.id for r in _call(channel, method)(argument)} == {SERIALIZED}
