"""bench/experience.py's yardstick: the same Batch bytes over a bare grpcio stream.

`serve_raw` is the receiving end, run as a process of its own (`python -m bench.experience_raw
PORT_FILE`): it reads each message, counts its bytes and answers it with an ack, nothing more.
`raw` streams prebuilt messages to it (or, `replay`, to a trainer's experience plane), and
`laid_out` builds the messages a RemoteDataCollector sends for full batches, byte for byte.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch

from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.options import server_options

BATCH = 64  # samples per batch, ours and raw alike
MAX_MESSAGE = 64 << 20
RAW_METHOD = "/bench.RawExperience/Collect"


def serve_raw(port_file: Path) -> None:
    """The raw yardstick: read each message, count its bytes, answer it with a small ack."""

    def collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for sequence, message in enumerate(requests):
            yield pb.BatchAck(sequence=sequence, samples=BATCH, payload_bytes=len(message))
            del message

    handler = grpc.stream_stream_rpc_method_handler(
        collect, response_serializer=pb.BatchAck.SerializeToString
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=server_options(MAX_MESSAGE)
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.RawExperience", {"Collect": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()


def laid_out(items: list[dict[str, torch.Tensor]], batch: int, collector_id: str) -> list[bytes]:
    """`items` as the messages a RemoteDataCollector sends for full batches of `batch`
    samples (shared/data/remote/wire.py), the last batch short of samples left out."""
    from shared.data.remote.wire import batch_layout, padded_varint
    from shared.weights.digest import byte_view

    first = items[0]
    tensors = [(n, "F32", tuple(t.shape), t.nbytes) for n, t in first.items()]
    layout = batch_layout("bulk", collector_id, tensors, batch)
    out = []
    for n, i in enumerate(range(0, len(items) - batch + 1, batch)):
        message = bytearray(layout.size)
        message[: len(layout.head)] = layout.head
        message[layout.sequence_at : layout.sequence_at + 10] = padded_varint(n + 1)
        for name in first:
            data = byte_view(torch.stack([item[name] for item in items[i : i + batch]]))
            message[layout.offsets[name] : layout.offsets[name] + len(data)] = data
        out.append(bytes(message))
    return out


def raw(channel: grpc.Channel, messages: list[bytes], method: str = RAW_METHOD) -> float:
    call = channel.stream_stream(
        method, request_serializer=None, response_deserializer=pb.BatchAck.FromString
    )
    started = time.perf_counter()
    acks = sum(1 for _ in call(iter(messages), timeout=600))
    took = time.perf_counter() - started
    assert acks == len(messages)
    return took


if __name__ == "__main__":
    serve_raw(Path(sys.argv[1]))
