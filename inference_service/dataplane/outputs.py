"""The only place that turns a model's outputs into OIP response tensors, and checks which
outputs a request asks for.

An output's raw contents (`raw_output_contents`: little-endian, row-major bytes, one entry per
tensor) come from its host array in one copy (`model_io.normalize_model_outputs` moved it there
on the model's thread); typed contents (`InferTensorContents`) are produced too, except for the
datatypes the protocol carries raw only (FP16, BF16: `shared.dtypes`), which go raw whatever the
request asked. BYTES raw contents are laid out as `bytes_wire` says. Inputs are decoded in
`codec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from inference_service.dataplane.bytes_wire import pack_bytes
from inference_service.dataplane.codec import PerSpecs
from inference_service.dataplane.model_io import NUMPY_DTYPES, OIP_OF_NUMPY, Tensor, is_array
from shared.app import TensorSpec
from shared.dtypes import BY_OIP, BY_TORCH, BYTES
from shared.errors import InvalidInputError, UnsupportedError
from shared.gen.inference import grpc_service_pb2 as pb

# Triton's classification extension: an output parameter asking for its top classes as BYTES.
CLASSIFICATION = "classification"


def requested_outputs(
    requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor],
    specs: Sequence[TensorSpec],
) -> list[str]:
    """The names of the outputs a request asks for (none: all), checked before its model runs:
    each must be one of `specs`, named once (an output named N times would be encoded N times),
    and not asked for as classes (Triton's classification extension, not offered here)."""
    if not requested:
        return []
    names = [output.name for output in requested]
    _check_names(names, _index_of(specs))
    for output in requested:
        if CLASSIFICATION in output.parameters and _classes(output.parameters[CLASSIFICATION]):
            raise UnsupportedError(
                f"output {output.name!r}: the classification extension is not supported; "
                "request the output itself and rank its values in the client"
            )
    return names


def _check_names(names: Sequence[str], index: Mapping[str, int]) -> None:
    """Each requested output name is one of the model's, named once."""
    seen: set[str] = set()
    for name in names:
        if name not in index:
            raise InvalidInputError(
                f"unknown output {name!r}; the model returns {', '.join(index)}"
            )
        if name in seen:
            raise InvalidInputError(f"output {name!r} is requested twice")
        seen.add(name)


def _classes(asked: pb.InferParameter) -> bool:
    """Whether a `classification` parameter asks for classes (as Triton reads it: an int64 of
    0 asks for none; any other value does, or is not one Triton takes)."""
    return not (asked.WhichOneof("parameter_choice") == "int64_param" and asked.int64_param == 0)


def encode_into(
    response: pb.ModelInferResponse,
    outputs: Sequence[Tensor],
    specs: Sequence[TensorSpec],
    requested: Sequence[str],
    raw: bool,
) -> None:
    """Add the requested outputs (all when none are named) to `response`, from outputs in host
    memory (`model_io.normalize_model_outputs` put them there): written in place, since
    building tensor messages apart and handing them to the response copies each one."""
    index = _index_of(specs)
    _check_names(requested, index)
    chosen = [index[name] for name in requested] if requested else list(range(len(specs)))
    raw = raw or any(BY_OIP[specs[i].datatype].field is None for i in chosen)
    for i in chosen:
        spec = specs[i]
        shape, data, values = _encode_output(spec, outputs[i], raw)
        out = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        field = BY_OIP[spec.datatype].field
        if data is not None:
            response.raw_output_contents.append(data)
        elif field is not None:
            getattr(out.contents, field.name).extend(values)


def _encode_output(
    spec: TensorSpec, value: Tensor, raw: bool
) -> tuple[list[int], bytes | None, list[Any]]:
    """One output's shape, and its raw contents (raw) or its values (typed)."""
    if spec.datatype == BYTES:
        shape, elements = _output_elements(spec.name, value)
        _check_rank(spec, shape)
        if raw:
            return shape, pack_bytes(elements), []
        return shape, None, list(elements)
    if is_array(value):
        assert isinstance(value, np.ndarray)
        _check_array(spec, value)
        shape = list(value.shape)
        if raw:
            return shape, value.tobytes(), []
        return shape, None, value.reshape(-1).tolist()
    tensor = _output_tensor(spec, value)
    shape = list(tensor.shape)
    if raw:
        return shape, _to_bytes(tensor), []
    return shape, None, tensor.reshape(-1).tolist()


def _check_array(spec: TensorSpec, value: np.ndarray[Any, Any]) -> None:
    """An output's host array (`model_io.normalize_model_outputs`) is of the datatype and rank
    the model declares."""
    if OIP_OF_NUMPY.get(value.dtype) != spec.datatype:
        raise RuntimeError(
            f"model output {spec.name!r} is {value.dtype} but the model declares {spec.datatype}"
        )
    _check_rank(spec, list(value.shape))


def _to_bytes(tensor: torch.Tensor) -> bytes:
    """The contiguous host tensor's bytes."""
    if tensor.dtype in NUMPY_DTYPES:
        return bytes(tensor.numpy().tobytes())
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _output_elements(name: str, value: Tensor) -> tuple[list[int], list[bytes]]:
    """A BYTES output's shape and its elements as bytes (str is UTF-8 encoded)."""
    array = value if isinstance(value, np.ndarray) else None
    if array is None:
        raise RuntimeError(
            f"model output {name!r} is declared BYTES: return a numpy array of bytes or str, "
            f"not a {type(value).__name__}"
        )
    elements: list[bytes] = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, str):
            item = item.encode()
        if not isinstance(item, bytes):
            raise RuntimeError(
                f"model output {name!r}: BYTES elements must be bytes or str, not "
                f"{type(item).__name__}"
            )
        elements.append(item)
    return list(array.shape), elements


def _output_tensor(spec: TensorSpec, value: Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(
            f"model output {spec.name!r} is a {type(value).__name__} but the model declares "
            f"{spec.datatype}; return a torch.Tensor"
        )
    if value.device.type != "cpu":  # never copied here: this runs on the event loop
        raise RuntimeError(
            f"model output {spec.name!r} reached the encoder on {value.device}; outputs are "
            "moved to the CPU where the model ran (normalize_model_outputs)"
        )
    tensor = value
    if tensor.requires_grad or not tensor.is_contiguous():
        tensor = tensor.detach().contiguous()
    entry = BY_TORCH.get(tensor.dtype)
    if entry is None or entry.oip != spec.datatype:
        raise RuntimeError(
            f"model output {spec.name!r} is {tensor.dtype} but the model declares {spec.datatype}"
        )
    _check_rank(spec, list(tensor.shape))
    return tensor


def _check_rank(spec: TensorSpec, shape: list[int]) -> None:
    if len(shape) != len(spec.shape):
        raise RuntimeError(
            f"model output {spec.name!r} has shape {shape} but the model declares "
            f"{list(spec.shape)}"
        )


# Each spec's position by name (a dict that must not be changed).
_index_of = PerSpecs(lambda specs: {spec.name: i for i, spec in enumerate(specs)})
