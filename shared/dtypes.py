"""Every tensor element type the project knows, one row each: its Open Inference Protocol
datatype name, torch dtype, safetensors dtype name, item size, and the OIP typed-contents field
that carries its values (with the numpy type the field is read as).

Every other module looks these facts up here: the datatypes an app may declare
(`shared.app`), the safetensors framing of weights (`shared.weights.layout`), and the data
plane's codec, outputs and client (`inference_service.dataplane.codec`, `.outputs`,
`inference_service.client`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from shared.errors import InvalidInputError


@dataclass(frozen=True)
class ContentsField:
    """One field of OIP's InferTensorContents, and the numpy type its values are read as."""

    name: str
    numpy: type[np.generic]


BOOL_CONTENTS = ContentsField("bool_contents", np.bool_)
INT_CONTENTS = ContentsField("int_contents", np.int32)
INT64_CONTENTS = ContentsField("int64_contents", np.int64)
UINT_CONTENTS = ContentsField("uint_contents", np.uint32)
UINT64_CONTENTS = ContentsField("uint64_contents", np.uint64)
FP32_CONTENTS = ContentsField("fp32_contents", np.float32)
FP64_CONTENTS = ContentsField("fp64_contents", np.float64)
BYTES_CONTENTS = ContentsField("bytes_contents", np.object_)


@dataclass(frozen=True)
class DType:
    """One element type. `oip` None: weights only (no OIP datatype); `torch_dtype` None: BYTES (no
    torch dtype, no safetensors name); `field` None: carried raw only (OIP has no typed field
    for it)."""

    oip: str | None
    torch_dtype: torch.dtype | None
    safetensors: str | None
    field: ContentsField | None = None

    @property
    def itemsize(self) -> int:
        """Bytes per element (BYTES elements have no fixed size)."""
        if self.torch_dtype is None:
            raise ValueError(f"{self.oip} elements have no fixed size")
        return self.torch_dtype.itemsize

    @cached_property
    def checked_range(self) -> tuple[int, int] | None:
        """The integer range typed values must be checked against: the dtype's own, where its
        contents field's type can hold values outside it (INT8 in int_contents); else None."""
        if self.field is None or self.torch_dtype is None or self.torch_dtype == torch.bool:
            return None
        if (
            self.torch_dtype.is_floating_point
            or self.itemsize >= np.dtype(self.field.numpy).itemsize
        ):
            return None
        info = torch.iinfo(self.torch_dtype)
        return int(info.min), int(info.max)


BYTES = "BYTES"

DTYPES: tuple[DType, ...] = (
    DType("BOOL", torch.bool, "BOOL", BOOL_CONTENTS),
    DType("UINT8", torch.uint8, "U8", UINT_CONTENTS),
    DType("UINT16", torch.uint16, "U16", UINT_CONTENTS),
    DType("UINT32", torch.uint32, "U32", UINT_CONTENTS),
    DType("UINT64", torch.uint64, "U64", UINT64_CONTENTS),
    DType("INT8", torch.int8, "I8", INT_CONTENTS),
    DType("INT16", torch.int16, "I16", INT_CONTENTS),
    DType("INT32", torch.int32, "I32", INT_CONTENTS),
    DType("INT64", torch.int64, "I64", INT64_CONTENTS),
    DType("FP16", torch.float16, "F16"),
    DType("BF16", torch.bfloat16, "BF16"),
    DType("FP32", torch.float32, "F32", FP32_CONTENTS),
    DType("FP64", torch.float64, "F64", FP64_CONTENTS),
    DType(BYTES, None, None, BYTES_CONTENTS),
    DType(None, torch.float8_e4m3fn, "F8_E4M3"),
    DType(None, torch.float8_e5m2, "F8_E5M2"),
    DType(None, torch.complex64, "C64"),
)

# OIP datatype name -> row (BYTES included).
BY_OIP: Mapping[str, DType] = {d.oip: d for d in DTYPES if d.oip is not None}
# The OIP datatypes a served model's inputs and outputs may declare.
OIP_DATATYPES = frozenset(BY_OIP)
# torch dtype -> row; safetensors dtype name -> row (weights travel in safetensors framing).
BY_TORCH: Mapping[torch.dtype, DType] = {
    d.torch_dtype: d for d in DTYPES if d.torch_dtype is not None
}
BY_SAFETENSORS: Mapping[str, DType] = {d.safetensors: d for d in DTYPES if d.safetensors}
# Every typed-contents field, in a fixed order (to name a misplaced one).
CONTENTS_FIELDS: tuple[ContentsField, ...] = tuple(
    sorted({d.field for d in DTYPES if d.field is not None}, key=lambda f: f.name)
)
_OIP_TORCH = [name for name, d in BY_OIP.items() if d.torch_dtype is not None]


def row_of(datatype: str) -> DType:
    """The row of an OIP datatype (BYTES included); InvalidInputError for unknown names."""
    entry = BY_OIP.get(datatype)
    if entry is None:
        raise InvalidInputError(
            f"datatype {datatype!r} is not supported; use one of {', '.join(BY_OIP)}"
        )
    return entry


def dtype_of(datatype: str) -> torch.dtype:
    """The torch dtype of an OIP datatype; InvalidInputError for BYTES and unknown names."""
    entry = BY_OIP.get(datatype)
    if entry is None or entry.torch_dtype is None:
        raise InvalidInputError(
            f"datatype {datatype!r} is not supported; use one of {', '.join(_OIP_TORCH)}"
        )
    return entry.torch_dtype


def datatype_of(dtype: torch.dtype) -> str:
    """The OIP datatype of a torch dtype; ValueError if it has none."""
    entry = BY_TORCH.get(dtype)
    if entry is None or entry.oip is None:
        raise ValueError(f"torch dtype {dtype} has no OIP datatype")
    return entry.oip
