"""The ceiling yardstick of bench/serve.py: a bare grpc.aio server doing no work.

ModelInfer on a generic handler with identity (de)serializers answers every request with one
canned, pre-serialized response (the MLP's output shape, [1, 10] FP32 raw): no decoding, no
model, no encoding, no interceptor, no metrics, on uvloop's event loop where installed (as
our service runs). What a Python gRPC server on grpc.aio answers at
most on this host; run as its own process, writing its port to the file named by argv[1].
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from shared.gen.inference import grpc_service_pb2 as pb


def canned_response() -> bytes:
    response = pb.ModelInferResponse(model_name="mlp", model_version="1")
    response.outputs.add(name="y", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(np.zeros((1, 10), np.float32).tobytes())
    return bytes(response.SerializeToString())


async def serve(port_file: Path) -> None:
    answer = canned_response()

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(model_infer)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": handler}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def main() -> int:
    # uvloop where installed, as our inference service runs (inference_service/server.py)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(Path(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
