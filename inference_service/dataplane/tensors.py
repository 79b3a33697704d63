"""The only place that converts OIP tensors to torch tensors and back.

Raw contents (`raw_input_contents` / `raw_output_contents`: little-endian, row-major bytes, one
entry per tensor) are the fast path: one copy into a tensor that owns its memory. Typed contents
(`InferTensorContents`) are accepted and produced too, except for FP16 and BF16, which the
protocol carries raw only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.app import TensorSpec
from shared.errors import InvalidInputError
from shared.gen.inference import grpc_service_pb2 as pb


@dataclass(frozen=True)
class Datatype:
    name: str
    dtype: torch.dtype
    field: str | None  # the InferTensorContents field; None: raw only
    low: int | None = None  # integer range the typed field must respect
    high: int | None = None


def _int_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


DATATYPES = {
    d.name: d
    for d in [
        Datatype("BOOL", torch.bool, "bool_contents"),
        Datatype("UINT8", torch.uint8, "uint_contents", *_int_range(torch.uint8)),
        Datatype("UINT16", torch.uint16, "uint_contents", *_int_range(torch.uint16)),
        Datatype("UINT32", torch.uint32, "uint_contents", *_int_range(torch.uint32)),
        Datatype("UINT64", torch.uint64, "uint64_contents"),
        Datatype("INT8", torch.int8, "int_contents", *_int_range(torch.int8)),
        Datatype("INT16", torch.int16, "int_contents", *_int_range(torch.int16)),
        Datatype("INT32", torch.int32, "int_contents"),
        Datatype("INT64", torch.int64, "int64_contents"),
        Datatype("FP16", torch.float16, None),
        Datatype("BF16", torch.bfloat16, None),
        Datatype("FP32", torch.float32, "fp32_contents"),
        Datatype("FP64", torch.float64, "fp64_contents"),
    ]
}
_BY_DTYPE = {d.dtype: d for d in DATATYPES.values()}
_FIELDS = sorted({d.field for d in DATATYPES.values() if d.field} | {"bytes_contents"})


def dtype_of(datatype: str) -> torch.dtype:
    entry = DATATYPES.get(datatype)
    if entry is None:
        raise InvalidInputError(
            f"datatype {datatype!r} is not supported; use one of {', '.join(DATATYPES)}"
        )
    return entry.dtype


def datatype_of(dtype: torch.dtype) -> str:
    entry = _BY_DTYPE.get(dtype)
    if entry is None:
        raise ValueError(f"torch dtype {dtype} has no OIP datatype")
    return entry.name


def _to_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def decode_inputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    """The request's input tensors, one per spec, in spec order, checked against the specs."""
    expected = {spec.name: spec for spec in specs}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of `inputs`"
        )
    found: dict[str, torch.Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        spec = expected.get(tensor.name)
        if spec is None:
            raise InvalidInputError(
                f"unknown input {tensor.name!r}; the model takes {', '.join(expected)}"
            )
        if tensor.name in found:
            raise InvalidInputError(f"input {tensor.name!r} is given twice")
        shape = _check_header(tensor, spec)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input {tensor.name!r} has typed contents while the request uses "
                    "raw_input_contents; use one form for all inputs"
                )
            found[tensor.name] = _from_raw(tensor.name, raw[index], spec.datatype, shape)
        else:
            found[tensor.name] = _from_typed(tensor, spec.datatype, shape)
    missing = [name for name in expected if name not in found]
    if missing:
        raise InvalidInputError(f"missing input(s) {', '.join(missing)}")
    return [found[spec.name] for spec in specs]


def _check_header(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec) -> list[int]:
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(
            f"input {tensor.name!r}: datatype {tensor.datatype!r} but the model takes "
            f"{spec.datatype}"
        )
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {tensor.name!r}: shape {shape} has a negative size")
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise InvalidInputError(
            f"input {tensor.name!r}: shape {shape} does not fit the model's {list(spec.shape)} "
            "(-1: any size)"
        )
    return shape


def _from_raw(name: str, data: bytes, datatype: str, shape: list[int]) -> torch.Tensor:
    dtype = dtype_of(datatype)
    want = math.prod(shape) * dtype.itemsize
    if len(data) != want:
        raise InvalidInputError(
            f"input {name!r}: {len(data)} raw bytes but {datatype}{shape} needs {want}"
        )
    if not data:
        return torch.empty(shape, dtype=dtype)
    # bytearray: one copy into writable memory the tensor owns (frombuffer on read-only bytes
    # would warn, and the model must not see the request's buffer).
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _from_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, datatype: str, shape: list[int]
) -> torch.Tensor:
    entry = DATATYPES[datatype]
    if entry.field is None:
        raise InvalidInputError(
            f"input {tensor.name!r}: {datatype} can only be sent in raw_input_contents"
        )
    contents = tensor.contents
    for other in _FIELDS:
        if other != entry.field and len(getattr(contents, other)):
            raise InvalidInputError(
                f"input {tensor.name!r}: {datatype} values belong in {entry.field}, not {other}"
            )
    values = getattr(contents, entry.field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"input {tensor.name!r}: {len(values)} values but shape {shape} needs {count}"
        )
    if entry.low is not None and entry.high is not None and values:
        low, high = min(values), max(values)
        if low < entry.low or high > entry.high:
            raise InvalidInputError(
                f"input {tensor.name!r}: values must lie in [{entry.low}, {entry.high}] "
                f"for {datatype}"
            )
    return torch.tensor(list(values), dtype=entry.dtype).reshape(shape)


def encode_outputs(
    outputs: Sequence[torch.Tensor],
    specs: Sequence[TensorSpec],
    requested: Sequence[str],
    raw: bool,
) -> tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Response tensors for the requested outputs (all when none are named)."""
    index = {spec.name: i for i, spec in enumerate(specs)}
    for name in requested:
        if name not in index:
            raise InvalidInputError(
                f"unknown output {name!r}; the model returns {', '.join(index)}"
            )
    chosen = [index[name] for name in requested] if requested else list(range(len(specs)))
    tensors = [outputs[i].detach().to("cpu").contiguous() for i in chosen]
    for i, tensor in zip(chosen, tensors, strict=True):
        spec = specs[i]
        if _BY_DTYPE.get(tensor.dtype) is None or datatype_of(tensor.dtype) != spec.datatype:
            raise RuntimeError(
                f"model output {spec.name!r} is {tensor.dtype} but the model declares "
                f"{spec.datatype}"
            )
        if tensor.dim() != len(spec.shape):
            raise RuntimeError(
                f"model output {spec.name!r} has shape {list(tensor.shape)} but the model "
                f"declares {list(spec.shape)}"
            )
    raw = raw or any(DATATYPES[specs[i].datatype].field is None for i in chosen)
    results = []
    contents: list[bytes] = []
    for i, tensor in zip(chosen, tensors, strict=True):
        spec = specs[i]
        out = pb.ModelInferResponse.InferOutputTensor(
            name=spec.name, datatype=spec.datatype, shape=list(tensor.shape)
        )
        if raw:
            contents.append(_to_bytes(tensor))
        else:
            field = DATATYPES[spec.datatype].field
            assert field is not None
            getattr(out.contents, field).extend(tensor.reshape(-1).tolist())
        results.append(out)
    return results, contents


def normalize_model_outputs(result: object, n_outputs: int) -> list[torch.Tensor]:
    """A model's return value as a list of its outputs: one Tensor, or a tuple/list of them."""
    if isinstance(result, torch.Tensor):
        items: list[object] = [result]
    elif isinstance(result, (tuple, list)):
        items = list(result)
    else:
        raise RuntimeError(
            f"the model returned a {type(result).__name__}; return a Tensor or a tuple of Tensors"
        )
    if len(items) != n_outputs or not all(isinstance(t, torch.Tensor) for t in items):
        raise RuntimeError(
            f"the model returned {len(items)} value(s) but declares {n_outputs} output tensor(s)"
        )
    return [t for t in items if isinstance(t, torch.Tensor)]
