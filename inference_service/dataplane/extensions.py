"""Triton's repository, shared-memory, trace and log RPCs, so that every call of tritonclient's
gRPC client gets a real answer rather than grpcio's bare "Method not found!".

What this service can answer, it answers: the repository index lists the served models, loading a
served model succeeds (it is loaded), and no shared-memory region is ever registered. What it does
not offer (unloading, shared-memory tensors, tracing, log settings over the wire) is UNIMPLEMENTED
with the reason and what to do instead.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

from inference_service.dataplane import convert
from inference_service.dataplane.service import DataPlane
from shared.errors import RegionNotFoundError, UnsupportedError
from shared.gen.inference import grpc_service_pb2 as pb
from shared.grpc.errors import grpc_errors_async

Context: TypeAlias = grpc.aio.ServicerContext

NO_SHARED_MEMORY = (
    "shared-memory tensors are not supported: send tensor contents in the request "
    "(raw_input_contents, or typed contents)"
)


def _no_region(name: str) -> None:
    """Every region named is unknown: registering is refused, so none exists."""
    if name:
        raise RegionNotFoundError(f"no shared-memory region named {name!r} is registered")


class TritonExtensions:
    """The methods of inference.GRPCInferenceService beyond the OIP core and ModelConfig /
    ModelStatistics; mixed into the servicer, which provides `_data`."""

    _data: DataPlane

    @grpc_errors_async
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        return convert.repository_index(self._data, ready_only=request.ready)

    @grpc_errors_async
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self._data.model(request.model_name)
        if request.parameters:
            raise UnsupportedError(
                f"model {request.model_name!r} is loaded as the service's app defines it; a load "
                f"takes no config or files here (weights arrive by trainer pushes)"
            )
        return pb.RepositoryModelLoadResponse()

    @grpc_errors_async
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._data.model(request.model_name)
        raise UnsupportedError(
            f"model {request.model_name!r} cannot be unloaded: the service serves the models its "
            f"app defines for as long as it runs"
        )

    @grpc_errors_async
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        _no_region(request.name)
        return pb.SystemSharedMemoryStatusResponse()

    @grpc_errors_async
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        raise UnsupportedError(NO_SHARED_MEMORY)

    @grpc_errors_async
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        _no_region(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @grpc_errors_async
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        _no_region(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    @grpc_errors_async
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise UnsupportedError(NO_SHARED_MEMORY)

    @grpc_errors_async
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        _no_region(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    @grpc_errors_async
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: Context
    ) -> pb.TraceSettingResponse:
        raise UnsupportedError(
            "request tracing is not supported: see the Prometheus metrics (--metrics-listen) "
            "and the service log, where failed requests appear with their ids"
        )

    @grpc_errors_async
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: Context
    ) -> pb.LogSettingsResponse:
        raise UnsupportedError(
            "log settings cannot be read or changed over the data plane: start the service "
            "with --log-level (or INFERENCE_LOG_LEVEL)"
        )
