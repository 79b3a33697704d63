"""Serve the experience plane on its own address: build, start (returns the bound port), stop.

It is a thread-pool server, as the sync plane is: few long streams, each batch decoded and
stored on the stream's thread. Memory stays bounded: a call's batches are read one at a time
(HTTP/2 flow control holds the sender back meanwhile), a batch is at most the size limit, the
calls at once are at most `streams`, a call that waits on its agent for `idle_timeout_s` is
ended (idle.py), and what is stored goes to bounded queues. It carries authentication of its
own, as the sync plane does it (a bearer token, `--experience-token`) and TLS (mutual with a
client CA, `--experience-tls-*`), grpc.health.v1 (open to all) and server reflection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc.auth import TlsFiles, TokenAuthInterceptor
from shared.grpc.health import Health
from shared.grpc.limits import CallBudget
from shared.grpc.reflection import enable_reflection
from shared.grpc.server import bind, new_server
from trainer_service.experience.idle import DEFAULT_IDLE_TIMEOUT_S, idle_collect_calls
from trainer_service.experience.service import ExperiencePlane
from trainer_service.experience.servicer import (
    LOOKUPS,
    SERVICE,
    ExperienceServicer,
    add_to_server,
)

logger = logging.getLogger(__name__)

DEFAULT_STREAMS = 32
# How long agents' calls in flight get to finish when the trainer stops.
STOP_GRACE_S = 5.0
PLANE = "experience plane"
# Room in a message beyond its payload: the buffer name, ids, protobuf framing.
ENVELOPE_BYTES = 1 << 16


@dataclass(frozen=True)
class ExperienceEndpoint:
    """Where and how the experience plane listens."""

    listen: str
    tls: TlsFiles | None
    token: str | None  # agents must present it; None: mTLS or the network alone guard it
    streams: int  # calls at once (each holds a thread)
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S  # a call waiting on its agent this long ends


class ExperienceServer:
    def __init__(self, plane: ExperiencePlane, endpoint: ExperienceEndpoint) -> None:
        self._endpoint = endpoint
        auth = [TokenAuthInterceptor(endpoint.token, PLANE)] if endpoint.token else []
        budget = CallBudget(endpoint.streams, PLANE, lookups=LOOKUPS)
        self._server = new_server(
            budget.threads,
            plane.max_batch_bytes + ENVELOPE_BYTES,
            auth,
            budget=budget,
            name="experience",
        )
        idle = idle_collect_calls(endpoint.idle_timeout_s)
        add_to_server(ExperienceServicer(plane, idle), self._server)
        self._health = Health()
        for service in ("", SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        enable_reflection(self._server, [SERVICE])

    def start(self) -> int:
        """Listen and serve; return the bound port."""
        port = bind(self._server, self._endpoint.listen, self._endpoint.tls)
        self._server.start()
        logger.info("experience plane on port %d", port)
        return port

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for `grace` s."""
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
