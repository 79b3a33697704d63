"""A typed Python client for the data plane: tensors in, tensors out.

Any Open Inference Protocol client works against the inference service (tritonclient, KServe's);
this one saves torch users the datatype bookkeeping. Tensors travel raw (little-endian bytes).
Failed calls raise `grpc.RpcError` with the server's status code and message. A data plane that
requires a token or TLS takes `token=`, `tls=` and `server_name=` (see `open_channel`).

    with InferenceClient("127.0.0.1:8001") as client:
        result = client.infer("quickstart", {"x": torch.linspace(-2, 2, 9).unsqueeze(1)})
        print(result.version, result.outputs["y"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from inference_service.dataplane.bytes_wire import pack_bytes
from inference_service.dataplane.codec import tensor_from_raw, tensor_from_typed
from inference_service.dataplane.model_io import Tensor
from shared.app import TensorSpec
from shared.dtypes import BYTES, datatype_of
from shared.gen.inference import grpc_service_pb2 as pb
from shared.gen.inference import grpc_service_pb2_grpc as pb_grpc
from shared.grpc.address import GRPC_SCHEMES, checked_address
from shared.grpc.auth import TlsFiles
from shared.grpc.channel import open_channel
from shared.grpc.options import DATA_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class InferResult:
    model_name: str
    version: int
    id: str
    outputs: dict[str, Tensor]  # BYTES outputs are numpy arrays of bytes


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class InferenceClient:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        token: str | None = None,
        tls: TlsFiles | None = None,
        server_name: str | None = None,
    ) -> None:
        """`timeout_s`: the deadline of every call. `token`: the data plane's bearer token.
        `tls`: connect over TLS (mutual TLS with a client certificate), verifying the service
        as `server_name` when `address` names it otherwise. ValueError: `address` is neither
        `HOST:PORT` (or `[V6]:PORT`) with a port from 1 to 65535, nor a gRPC target naming
        its scheme (`ipv4:`, `dns:`, `unix:` and the like), taken as it is."""
        if not address.startswith(GRPC_SCHEMES):
            checked_address(address, "an inference service's address")
        self._channel = open_channel(
            address,
            DATA_MAX_MESSAGE_BYTES,
            token=token,
            tls=tls,
            server_name=server_name,
            deadline_s=timeout_s,
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_ready(self) -> bool:
        response = self._stub.ServerReady(pb.ServerReadyRequest())
        return bool(response.ready)

    def model_ready(self, name: str) -> bool:
        response = self._stub.ModelReady(pb.ModelReadyRequest(name=name))
        return bool(response.ready)

    def metadata(self, name: str) -> ModelInfo:
        m = self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name))

        def specs(tensors: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> list[TensorSpec]:
            return [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors]

        return ModelInfo(m.name, list(m.versions), m.platform, specs(m.inputs), specs(m.outputs))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Tensor],
        *,
        outputs: Sequence[str] = (),
        request_id: str = "",
    ) -> InferResult:
        """Run one request. Inputs are torch tensors or numpy arrays, sent in their dtype; for
        BYTES, numpy arrays of bytes or str (dtype object, bytes_ or str_). TypeError for any
        other input, naming it."""
        request = pb.ModelInferRequest(model_name=model, id=request_id)
        for name, value in inputs.items():
            if isinstance(value, np.ndarray) and value.dtype.kind not in "OSU":
                value = torch.from_numpy(np.ascontiguousarray(value))
            if isinstance(value, torch.Tensor):
                data = value.detach().to("cpu").contiguous()
                request.inputs.add(name=name, datatype=datatype_of(data.dtype), shape=data.shape)
                raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()
            elif isinstance(value, np.ndarray):
                elements = [_element(name, e) for e in value.flat]
                request.inputs.add(name=name, datatype=BYTES, shape=value.shape)
                raw = pack_bytes(elements)
            else:
                raise TypeError(
                    f"input {name!r} is a {type(value).__name__}: give a torch tensor or a numpy "
                    "array (of bytes or str for BYTES)"
                )
            request.raw_input_contents.append(raw)
        for name in outputs:
            request.outputs.add(name=name)
        response = self._stub.ModelInfer(request)
        return InferResult(
            response.model_name, int(response.model_version), response.id, decode_outputs(response)
        )


def _element(name: str, element: object) -> bytes:
    """One element of a BYTES input: bytes as they are, str as UTF-8."""
    if isinstance(element, str):
        return element.encode()
    if isinstance(element, bytes | bytearray | memoryview):
        return bytes(element)
    raise TypeError(
        f"input {name!r} holds a {type(element).__name__}; the elements of a BYTES input are "
        "bytes or str"
    )


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, Tensor]:
    """Output tensors of a response, raw or typed (BYTES as numpy arrays of bytes), decoded as
    the server decodes a request's inputs; InvalidInputError if one does not parse."""
    raw = response.raw_output_contents
    result: dict[str, Tensor] = {}
    for index, output in enumerate(response.outputs):
        shape = list(output.shape)
        if raw:
            value = tensor_from_raw("output", output.name, raw[index], output.datatype, shape)
        else:
            value = tensor_from_typed(
                "output", output.name, output.contents, output.datatype, shape
            )
        result[output.name] = value
    return result
