"""The inference service's two gRPC servers: the OIP data plane and the weightsync sync plane.

They listen on separate addresses so the sync plane can be firewalled and authenticated apart
from the data plane. Both carry grpc.health.v1 (SERVING only while the data plane is ready) and
server reflection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inference_service.dataplane.batcher import BatchingConfig
from inference_service.dataplane.service import DataPlane
from inference_service.dataplane.servicer import InferenceServicer
from inference_service.persistence import Persister, WeightStore
from inference_service.served_model import ServedModel
from inference_service.syncplane.receiver import PushReceiver, SyncLimits
from inference_service.syncplane.servicer import WeightSyncServicer
from inference_service.syncplane.servicer import add_to_server as add_sync_servicer
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.grpc.auth import TlsFiles, TokenAuthInterceptor
from shared.grpc.options import DATA_MAX_MESSAGE_BYTES, SYNC_MAX_MESSAGE_BYTES
from shared.grpc.reflection import enable_reflection
from shared.grpc.server import bind, new_server

logger = logging.getLogger(__name__)

OIP_SERVICE = "inference.GRPCInferenceService"
SYNC_SERVICE = "weightsync.v1.WeightSync"


@dataclass(frozen=True)
class Ports:
    data: int
    sync: int


class InferenceServer:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        *,
        listen: str,
        sync_listen: str,
        workers: int = 8,
        limits: SyncLimits | None = None,
        server_version: str = "0",
        store: WeightStore | None = None,
        sync_token: str | None = None,
        data_token: str | None = None,
        tls: TlsFiles | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        self._tls = tls
        self.data_plane = DataPlane(models, batching)
        self._persister = Persister(store, models) if store is not None else None
        self.receiver = PushReceiver(
            models,
            limits or SyncLimits(),
            self._persister.committed if self._persister else None,
            store,
        )
        self._listen = listen
        self._sync_listen = sync_listen
        self._health = health.HealthServicer(experimental_non_blocking=True)
        for service in ("", OIP_SERVICE, SYNC_SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

        data_auth = [TokenAuthInterceptor(data_token, "data plane")] if data_token else []
        self._data_server = new_server(workers, DATA_MAX_MESSAGE_BYTES, data_auth)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.data_plane, server_version), self._data_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._data_server)
        enable_reflection(self._data_server, [OIP_SERVICE])

        sync_auth = (
            [TokenAuthInterceptor(sync_token, "sync plane", weaker=data_token)]
            if sync_token
            else []
        )
        concurrent = (limits or SyncLimits()).max_concurrent
        self._sync_server = new_server(
            concurrent + 2, SYNC_MAX_MESSAGE_BYTES, sync_auth, max_concurrent_rpcs=concurrent
        )
        add_sync_servicer(WeightSyncServicer(self.receiver), self._sync_server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._sync_server)
        enable_reflection(self._sync_server, [SYNC_SERVICE])

    def start(self) -> Ports:
        """Bind both addresses, start serving, and report ready; return the bound ports."""
        ports = Ports(
            bind(self._data_server, self._listen, self._tls),
            bind(self._sync_server, self._sync_listen, self._tls),
        )
        self._data_server.start()
        self._sync_server.start()
        self.data_plane.set_ready(True)
        for service in ("", OIP_SERVICE, SYNC_SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("data plane on port %d, sync plane on port %d", ports.data, ports.sync)
        return ports

    def stop(self, grace: float) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish for `grace`."""
        self._health.enter_graceful_shutdown()
        self.data_plane.set_ready(False)
        done = [self._data_server.stop(grace), self._sync_server.stop(grace)]
        for event in done:
            event.wait()
        self.data_plane.close()
        if self._persister is not None:
            self._persister.close()
        logger.info("stopped")
