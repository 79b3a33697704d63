"""A sync plane stuck on every push: a real gRPC server that answers pings, AcquireWriter and
GetModel (it holds nothing of any model yet, and takes pushes), and never reads a push. A push
small enough for the transport's buffers leaves whole into it without a sign."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES, server_options


@contextmanager
def unread_sync_plane() -> Iterator[str]:
    """Its address, while it runs."""
    stuck = threading.Event()

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        stuck.wait(600)
        return b""

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelState:
        return pb.ModelState(
            model_name=request.model_name, accepts_pushes=True, instance_id="unread"
        )

    def acquire(request: pb.AcquireWriterRequest, context: grpc.ServicerContext) -> pb.WriterLease:
        return pb.WriterLease(model_name=request.model_name, writer_id=request.writer_id, epoch=1)

    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(push),
        "GetModel": unary(
            get_model,
            request_deserializer=pb.GetModelRequest.FromString,
            response_serializer=pb.ModelState.SerializeToString,
        ),
        "AcquireWriter": unary(
            acquire,
            request_deserializer=pb.AcquireWriterRequest.FromString,
            response_serializer=pb.WriterLease.SerializeToString,
        ),
    }
    with serving_sync_plane(handlers) as address:
        try:
            yield address
        finally:
            stuck.set()  # before the server stops: its handlers' threads end


@contextmanager
def serving_sync_plane(handlers: dict[str, grpc.RpcMethodHandler]) -> Iterator[str]:
    """A real gRPC server answering weightsync.v1.WeightSync's methods in `handlers`, taking
    pings as a sync plane does; its address, while it runs."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=server_options(SYNC_MAX_MESSAGE_BYTES, frequent_pings=True),
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("weightsync.v1.WeightSync", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
