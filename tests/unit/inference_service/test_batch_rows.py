"""Batching's tensor operations: rows counted, joined and sliced back per request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_service.dataplane.batch_rows import (
    check_rows,
    common_rows,
    join_rows,
    shape_key,
    split_rows,
)
from inference_service.dataplane.codec import decode_inputs
from shared.app import TensorSpec
from shared.errors import InvalidInputError
from shared.gen.inference import grpc_service_pb2 as pb


def test_the_inputs_of_a_request_must_have_the_same_number_of_rows() -> None:
    specs = [TensorSpec("x", "FP32", (-1, 2)), TensorSpec("t", "BYTES", (-1,))]
    assert common_rows(specs, [torch.zeros(3, 2), np.array([b"a", b"b", b"c"], object)]) == 3
    with pytest.raises(InvalidInputError, match=r"first dimension: 'x' 1, 't' 0\)"):
        common_rows(specs, [torch.zeros(1, 2), np.array([], object)])


def test_requests_share_a_key_only_if_their_sizes_beyond_the_first_dimension_match() -> None:
    one = shape_key([torch.zeros(1, 2, 3), np.array([[b"a"]], object)])
    assert one == ((2, 3), (1,))
    assert shape_key([torch.zeros(5, 2, 3), np.array([[b"a"]] * 5, object)]) == one
    assert shape_key([torch.zeros(1, 3, 2), np.array([[b"a"]], object)]) != one


def test_joined_rows_split_back_to_each_request_its_own() -> None:
    parts = [torch.full((n, 2), float(n)) for n in (1, 3, 2)]
    joined = join_rows(parts)
    assert isinstance(joined, torch.Tensor) and joined.shape == (6, 2)
    back = split_rows([joined, joined * 10], [1, 3, 2])
    assert [len(b) for b in back] == [2, 2, 2]
    for part, (same, tenfold) in zip(parts, back, strict=True):
        assert torch.equal(same, part) and torch.equal(tenfold, part * 10)
    words = join_rows([np.array([b"a"], object), np.array([b"b", b"c"], object)])
    assert isinstance(words, np.ndarray) and words.tolist() == [b"a", b"b", b"c"]
    alone = torch.zeros(2, 2)
    assert join_rows([alone]) is alone


def test_requests_sent_raw_and_typed_join_in_one_batch_with_every_row_kept() -> None:
    spec = [TensorSpec("x", "INT8", (-1, 2))]
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype="INT8", shape=[1, 2])
    raw.raw_input_contents.append(np.array([[1, 2]], np.int8).tobytes())
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="INT8", shape=[2, 2]).contents.int_contents.extend(
        [3, 4, 5, 6]
    )
    (a,), (b,) = decode_inputs(raw, spec), decode_inputs(typed, spec)
    assert shape_key([a]) == shape_key([b])  # so a batcher joins them
    joined = join_rows([a, b])
    assert isinstance(joined, np.ndarray) and joined.dtype == np.int8
    assert joined.tolist() == [[1, 2], [3, 4], [5, 6]]
    mixed = join_rows([torch.tensor([[1, 2]], dtype=torch.int8), b])  # never dropped
    assert isinstance(mixed, np.ndarray) and mixed.tolist() == [[1, 2], [3, 4], [5, 6]]


def test_outputs_must_keep_one_row_per_input_row() -> None:
    check_rows("m", [torch.zeros(3, 1), np.array([b"a"] * 3, object)], 3)
    with pytest.raises(RuntimeError, match=r"model 'm' returned outputs of shapes \[\[2, 1\]\]"):
        check_rows("m", [torch.zeros(2, 1)], 3)
    with pytest.raises(RuntimeError, match="one row per input row"):
        check_rows("m", [torch.tensor(1.0)], 1)
