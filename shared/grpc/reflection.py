"""Server reflection over our private descriptor pool (see shared/gen/__init__.py)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from shared.gen import POOL


def _register_standard_services() -> None:
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)


def enable_reflection(server: grpc.Server, service_names: Sequence[str]) -> None:
    """Let grpcurl and friends list and describe `service_names`, health and reflection."""
    _register_standard_services()
    names = (
        *service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server, pool=POOL)
