"""The health servicers (shared/grpc/health.py) over real gRPC servers on loopback: every
watcher hears every change, whoever left before; Watch streams on an asyncio server are
bounded; at a drain each watch says NOT_SERVING and ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc.health import NOT_SERVING, SERVING, UNKNOWN, AsyncHealth, Health

REQUEST = health_pb2.HealthCheckRequest(service="model")


@asynccontextmanager
async def async_server(health: AsyncHealth) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)
    await server.stop(0)


def test_async_watchers_hear_every_change_after_others_left_and_are_bounded() -> None:
    async def scenario() -> None:
        health = AsyncHealth("test plane", watches=2)
        await health.set("model", SERVING)
        async with async_server(health) as stub:
            leaving = stub.Watch(REQUEST)
            staying = stub.Watch(REQUEST)
            assert (await leaving.read()).status == SERVING
            assert (await staying.read()).status == SERVING
            third = stub.Watch(REQUEST)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await third.read()
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at its limit of 2 health Watch streams at once" in str(refused.value.details())
            leaving.cancel()
            await asyncio.sleep(0.2)
            await health.set("model", NOT_SERVING)
            assert (await asyncio.wait_for(staying.read(), 5)).status == NOT_SERVING
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))  # a slot again
            assert (await unknown.read()).status == UNKNOWN
            await health.set("model", SERVING)
            assert (await asyncio.wait_for(staying.read(), 5)).status == SERVING
            await health.enter_graceful_shutdown()
            assert (await asyncio.wait_for(staying.read(), 5)).status == NOT_SERVING
            assert await asyncio.wait_for(staying.read(), 5) is grpc.aio.EOF  # and ended
            await health.set("model", SERVING)  # ignored while draining
            check = await stub.Check(REQUEST)
            assert check.status == NOT_SERVING

    asyncio.run(scenario())


@contextmanager
def threaded_server(health: Health) -> Iterator[health_pb2_grpc.HealthStub]:
    server = grpc.server(ThreadPoolExecutor(8))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)
    server.stop(0)


def test_threaded_watchers_hear_changes_and_end_at_the_drain() -> None:
    health = Health()
    health.set("model", SERVING)
    with threaded_server(health) as stub:
        leaving = stub.Watch(REQUEST, timeout=10)
        staying = stub.Watch(REQUEST, timeout=10)
        assert next(leaving).status == next(staying).status == SERVING
        leaving.cancel()
        unknown = stub.Watch(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=10)
        assert next(unknown).status == UNKNOWN
        unknown.cancel()
        health.set("model", NOT_SERVING)
        assert next(staying).status == NOT_SERVING
        health.set("model", SERVING)
        assert next(staying).status == SERVING
        health.enter_graceful_shutdown()
        assert [r.status for r in staying] == [NOT_SERVING]  # told, then ended
        with pytest.raises(grpc.RpcError) as missing:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "unknown service 'nope'"
