"""The only place that converts OIP tensors to what a model takes (`model_io`).

Raw contents (`raw_input_contents`: little-endian, row-major bytes, one entry per tensor) are the
fast path: a request's input is a read-only numpy view of its bytes, copied once into the tensor
the model takes on the model's thread (`model_io.to_model`; a batch's inputs are joined by that
copy). Typed contents (`InferTensorContents`) are accepted too, except for the datatypes the
protocol carries raw only (FP16, BF16: `shared.dtypes`); a request's typed input is read into a
numpy array of its datatype, so requests sent either way join one batch. BYTES raw contents are
laid out as `bytes_wire` says. Outputs are encoded in `outputs`.

The server decodes requests' inputs and the client (`inference_service.client`) responses'
outputs with the same checks (`tensor_from_raw`, which copies into a tensor of its own, and
`tensor_from_typed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch

from inference_service.dataplane.bytes_wire import LENGTH_BYTES, unpack_bytes
from inference_service.dataplane.model_io import (
    NUMPY_DTYPES,
    Tensor,
    bytes_array,
)
from shared.app import TensorSpec
from shared.dtypes import BYTES, CONTENTS_FIELDS, dtype_of, row_of
from shared.errors import InvalidInputError
from shared.gen.inference import grpc_service_pb2 as pb
from shared.grpc.options import DATA_MAX_MESSAGE_BYTES

# Which side of a call a tensor is on: its messages name it, and its raw field.
Role = Literal["input", "output"]
Contents = pb.InferTensorContents
T = TypeVar("T")


def decode_inputs(
    request: pb.ModelInferRequest,
    specs: Sequence[TensorSpec],
    max_message_bytes: int = DATA_MAX_MESSAGE_BYTES,
) -> list[Tensor]:
    """The request's input tensors, one per spec, in spec order, checked against the specs.

    Every shape is checked before any tensor is built: its sizes must fit the spec, and the
    elements they span must fit in a message of `max_message_bytes` (so no size, nor product
    of sizes, can overflow what numpy and torch compute from it, even with a size of 0)."""
    expected = _by_name(specs)
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents entries for {len(inputs)} inputs; "
            "send one per input, in the order of `inputs`"
        )
    is_raw = bool(raw)
    found: dict[str, Tensor] = {}
    for index, tensor in enumerate(inputs):
        name = tensor.name
        spec = expected.get(name)
        if spec is None:
            raise InvalidInputError(
                f"unknown input {name!r}; the model takes {', '.join(expected)}"
            )
        if name in found:
            raise InvalidInputError(f"input {name!r} is given twice")
        shape = _check_header(tensor, spec, is_raw, max_message_bytes)
        if is_raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input {name!r} has typed contents while the request uses "
                    "raw_input_contents; use one form for all inputs"
                )
            found[name] = _input_from_raw(name, raw[index], spec.datatype, shape)
        else:
            found[name] = _typed_array("input", name, tensor.contents, spec.datatype, shape)
    if len(found) != len(expected):
        missing = [name for name in expected if name not in found]
        raise InvalidInputError(f"missing input(s) {', '.join(missing)}")
    return [found[spec.name] for spec in specs]


def _check_header(
    tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, raw: bool, max_bytes: int
) -> list[int]:
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(
            f"input {tensor.name!r}: datatype {tensor.datatype!r} but the model takes "
            f"{spec.datatype}"
        )
    shape = list(tensor.shape)
    for got in shape:
        if got < 0:
            raise InvalidInputError(f"input {tensor.name!r}: shape {shape} has a negative size")
    fits = len(shape) == len(spec.shape)
    if fits:
        for want, got in zip(spec.shape, shape, strict=True):
            if want != got and want != -1:
                fits = False
                break
    if not fits:
        raise InvalidInputError(
            f"input {tensor.name!r}: shape {shape} does not fit the model's {list(spec.shape)} "
            "(-1: any size)"
        )
    _check_size(tensor.name, spec.datatype, shape, raw, max_bytes)
    return shape


def _check_size(name: str, datatype: str, shape: list[int], raw: bool, max_bytes: int) -> None:
    """InvalidInputError unless a message of `max_bytes` could carry a tensor of `shape`, sizes
    of 0 counted as 1 (the span numpy and torch compute strides over).

    The fewest bytes one element takes: raw, its size (a BYTES element, its length prefix);
    typed, one (a varint, or a BYTES element's length prefix)."""
    if not raw:
        per = 1
    elif datatype == BYTES:
        per = LENGTH_BYTES
    else:
        per = dtype_of(datatype).itemsize
    most = max_bytes // per
    span = 1
    for size in shape:  # stops early: a client's sizes may be up to 2**63 - 1 each
        span *= max(size, 1)
        if span > most:
            raise InvalidInputError(
                f"input {name!r}: shape {shape} is too large: a request of at most {max_bytes} "
                f"bytes carries at most {most} {datatype} elements "
                f"({'raw' if raw else 'typed'}), counting sizes of 0 as 1"
            )


def _input_from_raw(name: str, data: bytes, datatype: str, shape: list[int]) -> Tensor:
    """A request's input from its raw contents: a read-only numpy view of `data` where numpy
    has the datatype (the model's thread copies it: `model_io.to_model`), else as
    `tensor_from_raw` makes it."""
    array = NUMPY_DTYPES.get(dtype_of(datatype)) if datatype != BYTES else None
    if array is None:
        return tensor_from_raw("input", name, data, datatype, shape)
    _check_length("input", name, data, datatype, shape, array.itemsize)
    return np.frombuffer(data, array).reshape(shape)


def _check_length(
    role: Role, name: str, data: bytes, datatype: str, shape: list[int], itemsize: int
) -> None:
    """The raw bytes make `datatype` of `shape`: as many as it needs, and, for BOOL, each 0 or
    1 (numpy and torch take any other byte as a bool whose arithmetic is undefined)."""
    want = math.prod(shape) * itemsize
    if len(data) != want:
        raise InvalidInputError(
            f"{role} {name!r}: {len(data)} raw bytes but {datatype}{shape} needs {want}"
        )
    if data and dtype_of(datatype) is torch.bool and int(np.frombuffer(data, np.uint8).max()) > 1:
        raise InvalidInputError(f"{role} {name!r}: BOOL raw bytes must each be 0 or 1")


def tensor_from_raw(role: Role, name: str, data: bytes, datatype: str, shape: list[int]) -> Tensor:
    """One tensor from its raw contents, in memory of its own; InvalidInputError if the bytes do
    not make `datatype` of `shape`."""
    if datatype == BYTES:
        return bytes_array(unpack_bytes(f"{role} {name!r}", data, math.prod(shape)), shape)
    dtype = dtype_of(datatype)
    _check_length(role, name, data, datatype, shape, dtype.itemsize)
    if not data:
        return torch.empty(shape, dtype=dtype)
    array = NUMPY_DTYPES.get(dtype)
    if array is not None:
        # One copy into writable memory the tensor owns (the model must not see the message's
        # buffer), through numpy: a fifth of torch.frombuffer's cost on a small tensor.
        return torch.from_numpy(np.frombuffer(data, array).reshape(shape).copy())
    # bytearray: frombuffer on read-only bytes would warn
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def tensor_from_typed(
    role: Role, name: str, contents: Contents, datatype: str, shape: list[int]
) -> Tensor:
    """One tensor from its typed contents, in memory of its own (`_typed_array`, as a tensor;
    BYTES as its array)."""
    array = _typed_array(role, name, contents, datatype, shape)
    return array if array.dtype == object else torch.from_numpy(array)


def _typed_array(
    role: Role, name: str, contents: Contents, datatype: str, shape: list[int]
) -> np.ndarray[Any, Any]:
    """One tensor's values from its typed contents as a numpy array of its datatype (a BYTES
    array for BYTES), read in one pass (np.fromiter) and range-checked where the field's type is
    wider than the datatype; InvalidInputError if the values are in another field, too few or
    too many, or out of range."""
    label = f"{role} {name!r}"
    entry = row_of(datatype)
    field = entry.field
    if field is None:
        raise InvalidInputError(f"{label}: {datatype} can only be sent in raw_{role}_contents")
    for other in CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other.name)):
            raise InvalidInputError(
                f"{label}: {datatype} values belong in {field.name}, not {other.name}"
            )
    values = getattr(contents, field.name)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInputError(f"{label}: {len(values)} values but shape {shape} needs {count}")
    if entry.torch_dtype is None:  # BYTES
        return bytes_array(list(values), shape)
    array = np.fromiter(values, field.numpy, count)
    bounds = entry.checked_range
    if (
        bounds is not None
        and count
        and not bounds[0] <= int(array.min()) <= int(array.max()) <= bounds[1]
    ):
        raise InvalidInputError(
            f"{label}: values must lie in [{bounds[0]}, {bounds[1]}] for {datatype}"
        )
    # Every datatype typed contents carry has a numpy dtype (FP16 and BF16 travel raw only).
    return array.astype(NUMPY_DTYPES[entry.torch_dtype], copy=False).reshape(shape)


class PerSpecs(Generic[T]):
    """What decoding or encoding would otherwise rebuild on every request from a spec sequence
    (a served model's inputs or outputs, which live as long as the service): made once per
    sequence by `build`, keyed by identity, the sequence kept alongside so that its id cannot
    be reused. At most CACHED_MOST are kept, for callers that pass specs built per call."""

    def __init__(self, build: Callable[[Sequence[TensorSpec]], T]) -> None:
        self._build = build
        self._made: dict[int, tuple[Sequence[TensorSpec], T]] = {}

    def __call__(self, specs: Sequence[TensorSpec]) -> T:
        entry = self._made.get(id(specs))
        if entry is not None and entry[0] is specs:
            return entry[1]
        made = self._build(specs)
        if len(self._made) < CACHED_MOST:
            self._made[id(specs)] = (specs, made)
        return made


CACHED_MOST = 1024
# `specs` by name (a dict that must not be changed).
_by_name = PerSpecs(lambda specs: {spec.name: spec for spec in specs})
