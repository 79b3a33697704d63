"""grpc.health.v1 servicers, for thread-pool servers (`Health`) and asyncio ones (`AsyncHealth`).

grpcio-health-checking's reference servicers were replaced, for two defects a caller without a
token could reach. The threaded one keeps a set of watchers for every service name ever
watched, the empty set included once its watchers leave: a Watch of a megabyte-long unknown
name left a megabyte behind for good. The asyncio one drops the one condition all watchers
of a service wait on when any of them leaves: the others never hear of a change again (a
load balancer watching a replica missed its drain). Here every watcher waits on the
servicer's one condition, and nothing outlives a call but the statuses set.

Per the protocol, Check of an unknown service is NOT_FOUND; Watch of one answers
SERVICE_UNKNOWN and stays open, sending any later change. After `enter_graceful_shutdown`
every service is NOT_SERVING and stays so: each Watch sends that and ends, so that open watches
do not hold the drain for its whole grace period.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = int  # a HealthCheckResponse.ServingStatus value
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
ASYNC_WATCHES = 256  # Watch streams at once on an asyncio server (balancers, probes)


class _Statuses:
    """Each service's status ("" the server's), and whether the server is draining."""

    def __init__(self) -> None:
        self._of: dict[str, Status] = {"": SERVING}
        self._draining = False

    def get(self, service: str) -> Status | None:
        return self._of.get(service)

    def set(self, service: str, status: Status) -> bool:
        """Set `service`'s status; False when draining (nothing changes then)."""
        if self._draining:
            return False
        self._of[service] = status
        return True

    def drain(self) -> None:
        self._of = dict.fromkeys(self._of, NOT_SERVING)
        self._draining = True

    def current(self, service: str) -> Status:
        """`service`'s status, as a Watch reports it (SERVICE_UNKNOWN for one never set)."""
        status = self._of.get(service)
        return UNKNOWN if status is None else status

    def told_all(self, service: str, sent: Status | None) -> bool:
        """Draining, and the watcher knows: nothing will change any more."""
        return self._draining and self.current(service) == sent


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The health service of a thread-pool server. Each Watch holds its pool thread while it
    lasts (servers bound those: shared/grpc/limits.py)."""

    def __init__(self) -> None:
        self._statuses = _Statuses()
        self._changed = threading.Condition()

    def set(self, service: str, status: Status) -> None:
        """Set `service`'s status and tell its watchers."""
        with self._changed:
            if self._statuses.set(service, status):
                self._changed.notify_all()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, whatever is set later."""
        with self._changed:
            self._statuses.drain()
            self._changed.notify_all()

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        with self._changed:
            status = self._statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:200]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        service = request.service
        ended = threading.Event()

        def end() -> None:
            with self._changed:
                ended.set()
                self._changed.notify_all()

        context.add_callback(end)
        sent: Status | None = None
        while True:
            with self._changed:
                while (status := self._statuses.current(service)) == sent and not ended.is_set():
                    self._changed.wait()
            if ended.is_set():
                return
            sent = status
            yield health_pb2.HealthCheckResponse(status=status)
            if self._statuses.told_all(service, sent):
                return


class AsyncHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The health service of an asyncio server; its methods run on the server's loop. At most
    `watches` Watch streams at once (one beyond: RESOURCE_EXHAUSTED), since a stream held open
    costs the server memory whoever holds it; `plane` names the server in that refusal."""

    def __init__(self, plane: str, watches: int = ASYNC_WATCHES) -> None:
        self._statuses = _Statuses()
        self._changed = asyncio.Condition()
        self._watching = 0
        self._full = f"the {plane} is at its limit of {watches} health Watch streams at once"
        self._watches = watches

    async def set(self, service: str, status: Status) -> None:
        """Set `service`'s status and tell its watchers."""
        async with self._changed:
            if self._statuses.set(service, status):
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on, whatever is set later."""
        async with self._changed:
            self._statuses.drain()
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:200]!r}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if self._watching >= self._watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self._full}; retry later")
        self._watching += 1
        try:
            service = request.service
            sent: Status | None = None
            while True:
                status = self._statuses.current(service)
                if status != sent:
                    sent = status
                    yield health_pb2.HealthCheckResponse(status=status)
                if self._statuses.told_all(service, sent):
                    return
                async with self._changed:
                    while self._statuses.current(service) == sent:
                        await self._changed.wait()
        finally:
            self._watching -= 1
