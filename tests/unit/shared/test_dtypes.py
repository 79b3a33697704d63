"""The dtype table agrees with what it describes: torch, safetensors and the OIP protobuf."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from google.protobuf.descriptor import FieldDescriptor

from shared.dtypes import (
    BY_OIP,
    BY_SAFETENSORS,
    BY_TORCH,
    BYTES,
    CONTENTS_FIELDS,
    DTYPES,
    DType,
    datatype_of,
    dtype_of,
    row_of,
)
from shared.errors import InvalidInputError
from shared.gen.inference import grpc_service_pb2 as pb

# The numpy type that holds every value of each protobuf scalar type, exactly.
PROTO_NUMPY = {
    FieldDescriptor.TYPE_BOOL: np.bool_,
    FieldDescriptor.TYPE_INT32: np.int32,
    FieldDescriptor.TYPE_INT64: np.int64,
    FieldDescriptor.TYPE_UINT32: np.uint32,
    FieldDescriptor.TYPE_UINT64: np.uint64,
    FieldDescriptor.TYPE_FLOAT: np.float32,
    FieldDescriptor.TYPE_DOUBLE: np.float64,
    FieldDescriptor.TYPE_BYTES: np.object_,
}
WITH_TORCH = [d for d in DTYPES if d.torch_dtype is not None]


def test_every_name_and_dtype_has_one_row() -> None:
    assert len(BY_OIP) + sum(d.oip is None for d in DTYPES) == len(DTYPES)
    assert len(BY_TORCH) == len(WITH_TORCH)
    assert len(BY_SAFETENSORS) == sum(d.safetensors is not None for d in DTYPES)
    assert BY_OIP[BYTES].torch_dtype is None and BY_OIP[BYTES].safetensors is None


def test_the_contents_fields_are_the_protocols_with_their_exact_types() -> None:
    fields = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert sorted(f.name for f in CONTENTS_FIELDS) == sorted(fields)
    for field in CONTENTS_FIELDS:
        assert field.numpy is PROTO_NUMPY[fields[field.name].type], field.name


@pytest.mark.parametrize("row", WITH_TORCH, ids=lambda d: str(d.safetensors))
def test_safetensors_names_and_item_sizes_are_the_librarys(row: DType) -> None:
    assert row.torch_dtype is not None
    tensor = torch.zeros(3, dtype=row.torch_dtype)
    blob = safetensors.torch.save({"t": tensor})
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert header["t"]["dtype"] == row.safetensors
    assert row.itemsize == tensor.element_size()


@pytest.mark.parametrize("row", [d for d in WITH_TORCH if d.field], ids=lambda d: str(d.oip))
def test_typed_values_are_range_checked_exactly_where_the_field_is_wider(row: DType) -> None:
    assert row.torch_dtype is not None and row.field is not None
    field = np.dtype(row.field.numpy)
    assert field.kind == torch.empty(0, dtype=row.torch_dtype).numpy().dtype.kind
    if row.checked_range is None:
        assert field.itemsize == row.itemsize
    else:
        info = torch.iinfo(row.torch_dtype)
        assert row.checked_range == (info.min, info.max) and field.itemsize > row.itemsize


def test_lookups_name_what_is_supported() -> None:
    assert dtype_of("BF16") == torch.bfloat16 and datatype_of(torch.uint16) == "UINT16"
    assert row_of(BYTES) is BY_OIP[BYTES]
    with pytest.raises(InvalidInputError, match=r"'BYTES' is not supported; use one of BOOL, "):
        dtype_of(BYTES)
    with pytest.raises(InvalidInputError, match=r"'STRING' is not supported; .*FP64, BYTES$"):
        row_of("STRING")
    with pytest.raises(ValueError, match=r"torch\.complex64 has no OIP datatype"):
        datatype_of(torch.complex64)
