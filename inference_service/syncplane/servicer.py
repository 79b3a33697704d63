"""weightsync.v1.WeightSync: convert, delegate to the SyncPlane, convert back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from typing_extensions import override

from inference_service.syncplane import convert, messages
from inference_service.syncplane.inbox import TICK_S
from inference_service.syncplane.service import SyncPlane
from shared import protocol
from shared.errors import MalformedPushError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.grpc.errors import grpc_errors
from shared.grpc.handlers import register, unary
from shared.grpc.prefetch import Prefetcher


class WeightSyncServicer(pb_grpc.WeightSyncServicer):  # type: ignore[misc]
    def __init__(self, plane: SyncPlane) -> None:
        self._plane = plane

    @override
    @grpc_errors
    def Push(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.PushResponse:
        # Read on a thread of its own, so that waiting for a silent sender can time out (and see
        # its writer fenced): grpcio's request iterator blocks until the next message comes.
        with Prefetcher(request_iterator, name="push-receive") as ahead:
            parts = messages.parts(ahead.waiting(TICK_S), context.is_active)
            outcome = self._plane.push.handle(parts)
        return messages.push_response(outcome)

    @override
    @grpc_errors
    def AcquireWriter(
        self, request: pb.AcquireWriterRequest, context: grpc.ServicerContext
    ) -> pb.WriterLease:
        if not request.writer_id:
            raise MalformedPushError("AcquireWriter needs a writer_id naming the trainer")
        problem = protocol.writer_id_problem(request.writer_id)
        if problem is not None:
            raise MalformedPushError(f"AcquireWriter: {problem}")
        epoch = self._plane.acquire_writer(request.model_name, request.writer_id)
        model = self._plane.model(request.model_name)
        return pb.WriterLease(
            model_name=model.name,
            writer_id=request.writer_id,
            epoch=epoch,
            version=model.live.version,
        )

    @override
    @grpc_errors
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelState:
        return convert.model_state(self._plane.model(request.model_name), self._plane.instance_id)

    @override
    @grpc_errors
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        models = self._plane.models
        return pb.ListModelsResponse(
            models=[
                convert.model_state(models[name], self._plane.instance_id)
                for name in sorted(models)
            ]
        )

    @override
    @grpc_errors
    def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListVersionsResponse:
        versions = self._plane.versions(request.model_name)
        return convert.versions(request.model_name, self._plane.model(request.model_name), versions)

    @override
    @grpc_errors
    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.ModelState:
        self._plane.rollback(request.model_name, request.to_version)
        return convert.model_state(self._plane.model(request.model_name), self._plane.instance_id)

    @override
    @grpc_errors
    def Seed(self, request: pb.SeedRequest, context: grpc.ServicerContext) -> pb.HopResult:
        result = self._plane.seed(request.model_name, request.version, convert.hop(request.hop))
        return messages.hop_result(result)


def add_to_server(servicer: WeightSyncServicer, server: grpc.Server) -> None:
    """Register the service; Push takes its messages unparsed (see shared/weights/wire.py)."""
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(  # no request_deserializer: raw bytes
            servicer.Push, response_serializer=pb.PushResponse.SerializeToString
        ),
        "AcquireWriter": unary(servicer.AcquireWriter, pb.AcquireWriterRequest, pb.WriterLease),
        "GetModel": unary(servicer.GetModel, pb.GetModelRequest, pb.ModelState),
        "ListModels": unary(servicer.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
        "ListVersions": unary(
            servicer.ListVersions, pb.ListVersionsRequest, pb.ListVersionsResponse
        ),
        "Rollback": unary(servicer.Rollback, pb.RollbackRequest, pb.ModelState),
        "Seed": unary(servicer.Seed, pb.SeedRequest, pb.HopResult),
    }
    register(server, "weightsync.v1.WeightSync", handlers)
