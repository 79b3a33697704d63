"""One experience.v1 Collect call of a RemoteDataCollector, and how the end of a call reads.

Its requests are Batch messages the collector serialized itself (wire.py). A call that fails
because the address serves no experience.v1.Experience (grpcio's bare UNIMPLEMENTED "Method not
found!") reads as such (`status`), so a collector pointed at the wrong port says so."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shared import protocol
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.errors import error_details, error_reason

# Refusals of one batch: drop that batch (sending it again cannot succeed) and go on.
REFUSED_REASONS = (protocol.MALFORMED_BATCH, protocol.RESOURCE_LIMIT, protocol.INVALID_ARGUMENT)
# gRPC's own refusal of a message over the transport's limit, which carries no reason: the
# trainer's --experience-max-batch plus 64 KiB (a trainer restarted with a smaller limit).
TOO_LARGE = "Received message larger than max"


class Call:
    """One Collect call: requests go in through a queue, acks come back on a thread of its own,
    which hands each to `on_ack` and, at the end, the call and its error (None: it ended
    cleanly) to `on_end`."""

    def __init__(
        self,
        collect: grpc.StreamStreamMultiCallable,
        on_ack: Callable[[pb.BatchAck], None],
        on_end: Callable[[Call, grpc.RpcError | None], None],
    ) -> None:
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # serialized
        self.ending = False  # finished or cancelled from this side: send nothing more on it
        self.ended = False
        self._on_ack = on_ack
        self._on_end = on_end
        self._call: Any = collect(self._outgoing())
        self._receiver = threading.Thread(target=self._receive, name="experience-acks", daemon=True)
        self._receiver.start()

    def _outgoing(self) -> Iterator[bytes]:
        while (item := self.requests.get()) is not None:
            yield item
            # Not held while waiting for the next one: once acknowledged, the collector fills
            # a message's memory again only when nothing else refers to it.
            del item

    def _receive(self) -> None:
        error: grpc.RpcError | None = None
        try:
            for ack in self._call:
                self._on_ack(ack)
        except grpc.RpcError as exc:
            error = exc
        self._on_end(self, error)

    def finish(self) -> None:
        """End the call from this side (its last requests still go out)."""
        self.ending = True
        self.requests.put(None)

    def cancel(self) -> None:
        self.ending = True
        self._call.cancel()

    def join(self, timeout: float) -> None:
        self._receiver.join(timeout)


# The service a collector calls: where an address serves none (another port of a service, an
# inference service's data plane say), grpcio's bare "Method not found!" is said as much.
SERVICE = pb.DESCRIPTOR.services_by_name["Experience"].full_name


def status(error: grpc.RpcError) -> str:
    """`CODE: details` of a failed call to the experience plane (naming the service where the
    address serves none)."""
    code = error.code() if hasattr(error, "code") else None
    return f"{code.name if code else 'error'}: {error_details(error, SERVICE)}"


def refused(error: grpc.RpcError) -> bool:
    """Whether the call ended because the trainer refused the batch it was reading."""
    code = error.code() if hasattr(error, "code") else None
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return error_reason(error) in REFUSED_REASONS or TOO_LARGE in (error.details() or "")
