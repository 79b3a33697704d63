"""Clients that write to ModelStreamInfer streams and never read an answer: what the service
holds for them stays bounded (its window of requests a stream, and a bounded read-ahead)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import Inference, Services
from tests.integration.test_dataplane_holes import HOLES, output, request, rows, stub
from tests.integration.test_review_stream import MiB, padded


def resident_mib(inference: Inference) -> int:
    with open(f"/proc/{inference.process.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) // 1024


# Clients writing 1 MiB requests to ModelStreamInfer streams and never reading an answer: the
# handler stops reading a stream's requests once its window of answers waits, but gRPC's
# transport went on reading ahead as far as its bandwidth estimate let it, hundreds of MiB a
# stream, all held by the service; ten such streams grew a service past 11 GiB with its admission
# bound at 64 MiB (found by an outside review). Now a stream reads ahead 64 KiB beyond what its
# handler asks for.
def test_streams_never_read_hold_a_bounded_amount_of_memory(services: Services) -> None:
    inference = services.inference(HOLES, "--max-request-bytes-in-flight", str(16 * MiB))
    before = resident_mib(inference)
    x = rows(1, 4)  # a megabyte each in a parameter, which an answer echoes
    channels = [grpc.insecure_channel(inference.data) for _ in range(STREAMS)]
    taken = [0] * STREAMS

    def endless(i: int) -> Iterator[oip.ModelInferRequest]:
        while True:
            taken[i] += 1  # the transport asks for the next once it sent this one
            yield padded(request("ragged", x=x), MiB)

    calls = [
        oip_grpc.GRPCInferenceServiceStub(c).ModelStreamInfer(endless(i), timeout=120)
        for i, c in enumerate(channels)
    ]
    try:
        grown = 0
        for _ in range(40):
            time.sleep(0.25)
            grown = max(grown, resident_mib(inference) - before)
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    # A stream whose answers wait on its client stops taking requests: its window of requests,
    # the one waiting for a place in it, and what the socket's buffers and its transport's
    # read-ahead hold (69-74 requests a stream here). Answers refused for want of room are a few
    # bytes each and flow into the client's buffers, so a stream of those alone goes on (3,276
    # requests here). What the service holds is its admission bound's worth of answers and its
    # own buffers (88 MiB grown here; before the read-ahead was bounded, GiBs).
    assert grown < 320, f"the service grew {grown} MiB, taking {taken} requests"
    x = rows(1, 4)
    data = stub(inference)
    assert output(data.ModelInfer(request("ragged", x=x), timeout=10)).tobytes() == x.tobytes()


STREAMS = 6
