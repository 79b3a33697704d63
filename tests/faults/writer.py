"""Raw sync-plane clients built from the wire format, which the harness drives message by message.

A `Stream` is one Push call whose request messages the harness hands over one at a time, so it
can stop anywhere: after the header, mid-payload, before the commit, or right after it; then cut
the call (RST_STREAM), drop the connection, half-close the stream, or hold it open and silent.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.weights import wire
from tests.faults import stamp

CALL_TIMEOUT_S = 120.0  # a push that gets no answer in this long is cancelled (harness bug guard)
OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
]


@dataclass(frozen=True)
class Plan:
    """One push: its header fields and the state the model holds after it (`fills`)."""

    writer: str
    epoch: int
    version: int
    base: int
    fills: stamp.Fills
    parts: tuple[int, ...] | None  # the parts carried; None: every part (a full push)

    @property
    def digest(self) -> bytes:
        return stamp.digest(self.fills)

    def messages(self) -> tuple[bytes, list[bytes], bytes]:
        """The serialized header, data messages and commit."""
        data = [wire.encode_data([c]) for c in stamp.payload_chunks(self.fills, self.parts)]
        header = pb.PushHeader(
            model_name=stamp.MODEL,
            version=self.version,
            base_version=self.base,
            writer_id=self.writer,
            payload_bytes=sum(len(wire.data_payload(m) or b"") for m in data),
            writer_epoch=self.epoch,
        )
        commit = pb.PushRequest(commit=pb.PushCommit(digest=self.digest))
        return (
            pb.PushRequest(header=header).SerializeToString(),
            data,
            commit.SerializeToString(),
        )


@dataclass(frozen=True)
class Answer:
    """How a call ended: `code` OK with the response, or an error code and its details."""

    code: grpc.StatusCode
    details: str
    response: pb.PushResponse | None = None

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    def describe(self) -> str:
        if self.response is not None:
            return f"OK version={self.response.version}"
        return f"{self.code.name}: {self.details}"


_END = object()


class Stream:
    """One Push call fed from a queue."""

    def __init__(self, call: grpc.StreamUnaryMultiCallable, plan: Plan) -> None:
        self.plan = plan
        self.header, self.data, self.commit = plan.messages()
        self.sent_data = 0  # data messages handed to the stream so far
        self.commit_queued = False
        self._queue: queue.Queue[object] = queue.Queue()
        self._taken = 0
        self._taken_cond = threading.Condition()
        self.future = call.future(self._requests(), timeout=CALL_TIMEOUT_S)

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            assert isinstance(item, bytes)
            yield item
            with self._taken_cond:
                self._taken += 1
                self._taken_cond.notify_all()

    def _put(self, message: bytes) -> None:
        self._queue.put(message)

    def send_header(self) -> None:
        self._put(self.header)

    def send_data(self, count: int | None = None) -> None:
        """Hand over the next `count` data messages (None: all the rest)."""
        end = len(self.data) if count is None else min(len(self.data), self.sent_data + count)
        for message in self.data[self.sent_data : end]:
            self._put(message)
        self.sent_data = end

    def send_commit(self) -> None:
        self.send_data()
        self.commit_queued = True
        self._put(self.commit)

    def wait_taken(self, timeout: float = 30.0) -> bool:
        """Wait until gRPC has taken every message queued so far (or the call has ended)."""
        queued = 1 + self.sent_data + (1 if self.commit_queued else 0)
        with self._taken_cond:
            return self._taken_cond.wait_for(
                lambda: self._taken >= queued or self.future.done(), timeout
            )

    def half_close(self) -> None:
        self._queue.put(_END)

    def cancel(self) -> bool:
        """Cut the call (RST_STREAM); False if it had already ended."""
        cancelled = bool(self.future.cancel())
        self._queue.put(_END)  # free gRPC's consumer thread if it waits on the queue
        return cancelled

    def done(self) -> bool:
        return bool(self.future.done())

    def answer(self, timeout: float = CALL_TIMEOUT_S) -> Answer:
        try:
            response = self.future.result(timeout=timeout)
        except grpc.FutureCancelledError:
            return Answer(grpc.StatusCode.CANCELLED, "cancelled by the harness")
        except grpc.FutureTimeoutError:
            self.cancel()
            return Answer(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time (harness)")
        except grpc.RpcError as error:
            return Answer(error.code(), error.details() or "")
        finally:
            self._queue.put(_END)
        return Answer(grpc.StatusCode.OK, "", response)


class RawWriter:
    """A writer identity with its own channel and the epoch it was last granted (0: none)."""

    def __init__(self, writer_id: str, address: str) -> None:
        self.id = writer_id
        self.address = address
        self.epoch = 0
        self._channel: grpc.Channel | None = None

    def _open(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, options=OPTIONS)
        return self._channel

    def acquire(self) -> pb.WriterLease | Answer:
        """AcquireWriter; the lease, or the error answered."""
        stub = pb_grpc.WeightSyncStub(self._open())
        request = pb.AcquireWriterRequest(model_name=stamp.MODEL, writer_id=self.id)
        try:
            lease: pb.WriterLease = stub.AcquireWriter(request, timeout=60, wait_for_ready=True)
        except grpc.RpcError as error:
            return Answer(error.code(), error.details() or "")
        return lease

    def stream(self, plan: Plan) -> Stream:
        call = self._open().stream_unary(
            "/weightsync.v1.WeightSync/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )
        return Stream(call, plan)

    def disconnect(self) -> None:
        """Drop the connection (every call on it ends); the next call opens a new one."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    close = disconnect
