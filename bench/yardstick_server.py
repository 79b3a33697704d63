"""The yardsticks' receiving end, run as its own process by bench/sync.py.

Two client-streaming methods on a generic handler with identity (de)serializers, so nothing but
grpcio's own transport cost is measured:
- /bench.Yardstick/Raw counts the bytes it receives;
- /bench.Yardstick/Naive is the common path: join the chunks, torch.load (weights_only=True) and
  load_state_dict into a model of the same shape.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from bench.apps import Blocks
from shared.allocator import tune_for_streaming
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES, server_options
from shared.settings import ProcessSettings


def raw(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    total = 0
    for chunk in requests:
        total += len(chunk)
    return str(total).encode()


def make_naive(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    def naive(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        blob = b"".join(requests)
        state = torch.load(io.BytesIO(blob), weights_only=True)
        model.load_state_dict(state)
        return str(len(blob)).encode()

    return naive


def main() -> int:
    # The same malloc settings as our services (shared/allocator.py): raw grpcio's receiving
    # side pays the same page faults without them, so the yardstick stays the transport at its
    # best.
    tune_for_streaming(ProcessSettings.from_environ(os.environ, "bench").malloc)
    port_file = Path(sys.argv[1])
    model = Blocks(int(os.environ["BENCH_MB"]), int(os.environ["BENCH_TENSORS"]))
    handlers = {
        "Raw": grpc.stream_unary_rpc_method_handler(raw),
        "Naive": grpc.stream_unary_rpc_method_handler(make_naive(model)),
    }
    server = grpc.server(ThreadPoolExecutor(4), options=server_options(SYNC_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Yardstick", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
