"""Tensor values the codec tests send: each datatype's extremes, bitwise comparison, and
outputs encoded as a response carries them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inference_service.dataplane.model_io import Tensor
from inference_service.dataplane.outputs import encode_into
from shared.app import TensorSpec
from shared.dtypes import dtype_of
from shared.gen.inference import grpc_service_pb2 as pb


def extremes(datatype: str) -> torch.Tensor:
    """One row holding the datatype's extreme and special values."""
    dtype = dtype_of(datatype)
    if dtype == torch.bool:
        return torch.tensor([[True, False, True]])
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        values = [info.min, info.max, -0.0, float("inf"), float("nan"), 1.5]
        return torch.tensor([values], dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.tensor([[info.min, info.max, 0, 1]], dtype=dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return (
        a.contiguous().view(torch.uint8).numpy().tobytes()
        == b.contiguous().view(torch.uint8).numpy().tobytes()
    )


def encode_outputs(
    outputs: Sequence[Tensor],
    specs: Sequence[TensorSpec],
    requested: Sequence[str],
    raw: bool,
) -> tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Response tensors for the requested outputs (all when none are named), and their raw
    contents, as the service's `encode_into` writes them into a response."""
    response = pb.ModelInferResponse()
    encode_into(response, outputs, specs, requested, raw)
    return list(response.outputs), list(response.raw_output_contents)
