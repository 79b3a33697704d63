"""experience.v1.Experience: convert, delegate to the ExperiencePlane, convert back.

Collect takes its Batch messages unparsed and reads them by hand (shared/data/remote/wire.py),
the payload a view of the message: protobuf's parse would copy it (see shared/weights/wire.py).
A stream's batches that repeat the layout of one checked before skip the parsing and checks
(layouts.py). A call that waits on its agent too long is ended (idle.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import grpc
from typing_extensions import override

from shared.data.remote.wire import parse_batch
from shared.errors import ServiceError
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as pb_grpc
from shared.grpc.errors import abort, failure, grpc_errors
from shared.grpc.handlers import register, unary
from shared.grpc.idle import IdleCalls, WatchedCall
from trainer_service.experience.layouts import Known, learn
from trainer_service.experience.service import BufferInfo, ExperiencePlane, Stored


class ExperienceServicer(pb_grpc.ExperienceServicer):  # type: ignore[misc]
    def __init__(self, plane: ExperiencePlane, idle: IdleCalls) -> None:
        self._plane = plane
        self._idle = idle  # ends the calls that wait on their agent too long

    @override
    def Collect(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[pb.BatchAck]:
        # A generator: the error table is applied inside it, where the errors are raised.
        try:
            with self._idle.watch(context) as call:
                yield from self._collect(call, request_iterator)
        except grpc.RpcError:
            return  # the agent went away or idled mid-call: what it was acknowledged is stored
        except Exception as error:
            if not isinstance(error, ServiceError) and context.code() is not None:
                raise  # aborted on purpose
            abort(context, failure(error, "Experience.Collect"))

    def _collect(self, call: WatchedCall, requests: Iterator[bytes]) -> Iterator[pb.BatchAck]:
        """Store each batch of the call and acknowledge it."""
        known: Known | None = None  # the layout of this stream's full batches, once checked
        for message in call.reading(requests):
            sequence = None if known is None else known.sequence(message)
            if known is not None and sequence is not None:
                stored = self._plane.store_block(
                    known.buffer,
                    sequence,
                    known.payload_bytes,
                    known.collector_id,
                    partial(known.block, message),
                )
            else:
                batch = parse_batch(message)
                stored = self._plane.store(
                    batch.buffer, batch.sequence, batch.payload, batch.collector_id
                )
                if not stored.duplicate:
                    schema = self._plane.schema(batch.buffer)
                    found = learn(message, batch, schema, self._plane.max_batch_samples)
                    known = known if found is None else found
            with call.sending():
                yield ack(stored)

    @override
    @grpc_errors
    def ListBuffers(
        self, request: pb.ListBuffersRequest, context: grpc.ServicerContext
    ) -> pb.ListBuffersResponse:
        return pb.ListBuffersResponse(
            buffers=[buffer_state(b) for b in self._plane.buffers()],
            max_batch_bytes=self._plane.max_batch_bytes,
            max_batch_samples=self._plane.max_batch_samples,
        )


def ack(stored: Stored) -> pb.BatchAck:
    return pb.BatchAck(
        sequence=stored.sequence,
        buffer=stored.buffer,
        samples=stored.samples,
        payload_bytes=stored.payload_bytes,
        duplicate=stored.duplicate,
    )


def buffer_state(info: BufferInfo) -> pb.BufferState:
    return pb.BufferState(
        name=info.name,
        tensors=[
            pb.TensorSpec(name=c.name, datatype=c.datatype, shape=list(c.shape))
            for c in info.columns
        ],
        size=info.size,
        received=info.received,
        max_queue_size=info.max_queue_size,
    )


SERVICE = "experience.v1.Experience"
# Answers at once, from slots of its own (shared/grpc/limits.py): the plane lists its buffers
# while agents' streams fill every slot of theirs.
LOOKUPS = frozenset({f"/{SERVICE}/ListBuffers"})


def add_to_server(servicer: ExperienceServicer, server: grpc.Server) -> None:
    """Register the service; Collect takes its messages unparsed."""
    handlers = {
        "Collect": grpc.stream_stream_rpc_method_handler(  # no request_deserializer: raw bytes
            servicer.Collect, response_serializer=pb.BatchAck.SerializeToString
        ),
        "ListBuffers": unary(servicer.ListBuffers, pb.ListBuffersRequest, pb.ListBuffersResponse),
    }
    register(server, SERVICE, handlers)
