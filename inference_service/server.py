"""The inference service's two gRPC servers: the OIP data plane and the weightsync sync plane.

They listen on separate addresses so the sync plane can be firewalled and authenticated apart
from the data plane. Both carry grpc.health.v1 (SERVING only while the data plane is ready) and
server reflection. The data plane is a grpc.aio server on an event loop thread of its own
(uvloop's; many small calls: one loop beats a thread per call); the sync plane is a thread-pool
server (few, long streams whose per-message work releases the GIL), run at a lower CPU priority.

With the sync relay (`--sync-relay on`, and `auto` where the service may use 4 or more CPUs)
the sync plane's address belongs to the relay, a process of its own that
receives pushes' bulk bytes off this process's gRPC threads and GIL (see syncplane/relay/ for
why and what it cost), and this process's sync server listens on a private Unix socket.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_service.dataplane.service import DataPlane
from inference_service.dataplane.servicer import InferenceServicer
from inference_service.persister import Persister
from inference_service.syncplane.relay.supervisor import RelaySupervisor
from inference_service.syncplane.service import SyncPlane
from inference_service.syncplane.servicer import WeightSyncServicer
from inference_service.syncplane.servicer import add_to_server as add_sync_servicer
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.grpc.auth import AsyncTokenAuthInterceptor, TlsFiles, TokenAuthInterceptor
from shared.grpc.health import AsyncHealth, Health
from shared.grpc.limits import CallBudget
from shared.grpc.options import (
    DATA_MAX_MESSAGE_BYTES,
    SYNC_MAX_ANSWER_BYTES,
    SYNC_MAX_MESSAGE_BYTES,
)
from shared.grpc.reflection import enable_reflection
from shared.grpc.server import bind, new_aio_server, new_server

logger = logging.getLogger(__name__)

OIP_SERVICE = "inference.GRPCInferenceService"
SYNC_SERVICE = "weightsync.v1.WeightSync"
SERVICES = ("", OIP_SERVICE, SYNC_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop, asyncio's where uvloop is not installed (it has no Windows build).
    Measured with bench/curve.py on this project's 2-core machine, interleaved: 8 clients
    3,462-3,550 requests/s against 3,084-3,234 with asyncio's loop, 32 clients 3,425-3,563
    against 3,053-3,282."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass(frozen=True)
class Ports:
    data: int
    sync: int


@dataclass(frozen=True)
class DataEndpoint:
    """Where and how the data plane listens."""

    listen: str
    tls: TlsFiles | None
    token: str | None  # clients must present it; None: open
    server_version: str


@dataclass(frozen=True)
class SyncEndpoint:
    """Where and how the sync plane listens (the relay's address, when there is a relay)."""

    listen: str
    tls: TlsFiles | None
    token: str | None  # trainers must present it; None: mTLS or loopback alone guard the plane
    weaker_token: str | None  # the data plane's: refused by name on the sync plane
    budget: CallBudget  # calls past authentication, within the writers' budget
    nice: int  # how much lower the receiving threads' CPU priority is than serving's


class InferenceServer:
    """Serves built parts: the data plane's use-cases, the sync plane's (and the sync relay
    in front of it, if any), on the two endpoints; closes them all on stop."""

    def __init__(
        self,
        data_plane: DataPlane,
        sync_plane: SyncPlane,
        data: DataEndpoint,
        sync: SyncEndpoint,
        *,
        relay: RelaySupervisor | None = None,
        persister: Persister | None = None,
    ) -> None:
        self.data_plane = data_plane
        self.sync_plane = sync_plane
        self._data = data
        self._sync = sync
        self._relay = relay
        self._persister = persister
        self._loop = new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="data-plane", daemon=True
        )
        self._data_server: grpc.aio.Server | None = None
        self._data_health: AsyncHealth | None = None
        self._health = Health()  # the sync plane's
        for service in SERVICES:
            self._health.set(service, NOT_SERVING)

        # With the relay, the sync plane's address is the relay process's: it authenticates
        # callers and hands this server the calls other than Push over a private Unix socket.
        sync_auth = (
            [TokenAuthInterceptor(sync.token, "sync plane", weaker=sync.weaker_token)]
            if sync.token and relay is None
            else []
        )
        # Receiving weights (parse, copy, hash) runs at a lower CPU priority than serving, so
        # a push slows itself down rather than the requests when CPUs are short.
        self._sync_server = new_server(
            sync.budget.threads,
            SYNC_MAX_MESSAGE_BYTES,
            sync_auth,
            budget=sync.budget,
            name="sync",
            nice=sync.nice,
            frequent_pings=True,  # hops passing a push on watch their link (leg.py)
            max_answer_bytes=SYNC_MAX_ANSWER_BYTES,
        )
        add_sync_servicer(WeightSyncServicer(sync_plane), self._sync_server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._sync_server)
        enable_reflection(self._sync_server, [SYNC_SERVICE])

    async def _start_data_server(self) -> int:
        """Build, bind and start the data plane's aio server on its loop; return its port."""
        token = self._data.token
        auth = [AsyncTokenAuthInterceptor(token, "data plane")] if token else []
        server = new_aio_server(DATA_MAX_MESSAGE_BYTES, auth)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.data_plane, self._data.server_version), server
        )
        self._data_health = AsyncHealth("data plane")
        for service in SERVICES:
            await self._data_health.set(service, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._data_health, server)
        enable_reflection(server, [OIP_SERVICE])
        port = bind(server, self._data.listen, self._data.tls, "--listen")
        await server.start()
        self._data_server = server
        return port

    async def _set_data_health(self, status: int) -> None:
        assert self._data_health is not None
        for service in SERVICES:
            await self._data_health.set(service, status)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def sync_relay_pid(self) -> int | None:
        """The sync relay process's pid (None when the sync plane runs in this process)."""
        return self._relay.pid if self._relay is not None else None

    def start(self) -> Ports:
        """Bind both addresses, start serving, and report ready; return the bound ports."""
        self._loop_thread.start()
        data_port = self._on_loop(self._start_data_server())
        if self._relay is None:
            sync_port = bind(self._sync_server, self._sync.listen, self._sync.tls, "--sync-listen")
            self._sync_server.start()
        else:
            bind(self._sync_server, self._relay.open())
            self._sync_server.start()
            sync_port = self._relay.start()
        ports = Ports(data_port, sync_port)
        self.sync_plane.serving_at(self._sync.listen, sync_port)
        self.data_plane.set_ready(True)
        self._on_loop(self._set_data_health(SERVING))
        for service in SERVICES:
            self._health.set(service, SERVING)
        logger.info("data plane on port %d, sync plane on port %d", ports.data, ports.sync)
        return ports

    def _stop_sync(self, grace: float) -> None:
        if self._relay is not None:  # first: its calls in flight still reach the sync server
            self._relay.stop(grace)
        self._sync_server.stop(grace).wait()

    def stop(self, grace: float) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish for `grace`."""
        self._health.enter_graceful_shutdown()
        if self._data_health is not None:
            self._on_loop(self._data_health.enter_graceful_shutdown())
        self.data_plane.set_ready(False)
        sync_stopped = threading.Thread(target=self._stop_sync, args=(grace,))
        sync_stopped.start()
        if self._data_server is not None:
            self._on_loop(self._data_server.stop(grace))
        sync_stopped.join()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
        self.data_plane.close()
        if self._persister is not None:
            self._persister.close()
        logger.info("stopped")
