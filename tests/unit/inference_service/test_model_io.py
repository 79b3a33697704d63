"""What a model takes and returns: its return value checked, sized, and handed over in host
memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_service.dataplane.model_io import (
    empty_like_spec,
    normalize_model_outputs,
    tensor_bytes,
    to_model,
)
from shared.app import TensorSpec
from tests.devices import NEEDS_CUDA


def test_a_models_return_value_must_match_its_declared_outputs() -> None:
    with pytest.raises(RuntimeError, match="declares 2 output tensor"):
        normalize_model_outputs(torch.ones(1), 2)
    with pytest.raises(RuntimeError, match="returned a dict"):
        normalize_model_outputs({}, 1)
    words = np.array([b"a"], object)
    one, two = normalize_model_outputs((torch.ones(1), words), 2)
    assert isinstance(one, np.ndarray) and one.dtype == np.float32 and one.tolist() == [1.0]
    assert two is words


def test_outputs_leave_the_models_thread_as_host_arrays_where_numpy_has_their_dtype() -> None:
    result = torch.arange(6.0).reshape(3, 2)
    (array,) = normalize_model_outputs(result, 1)
    assert isinstance(array, np.ndarray) and np.shares_memory(array, result.numpy())
    (half,) = normalize_model_outputs(torch.ones(2, dtype=torch.bfloat16), 1)
    assert isinstance(half, torch.Tensor) and half.dtype == torch.bfloat16  # numpy has no bf16
    with torch.enable_grad():
        graded = torch.ones(2, requires_grad=True) * 2
    (plain,) = normalize_model_outputs(graded, 1)
    assert isinstance(plain, np.ndarray) and plain.tolist() == [2.0, 2.0]
    (negated,) = normalize_model_outputs(torch._neg_view(torch.tensor([1.0, -2.0])), 1)
    assert isinstance(negated, np.ndarray) and negated.tolist() == [-1.0, 2.0]


def test_to_model_gives_the_model_tensors_of_its_own() -> None:
    data = np.arange(4, dtype=np.int32).tobytes()
    view = np.frombuffer(data, np.int32)  # read-only: a request's bytes
    taken = to_model(view, torch.device("cpu"))
    assert isinstance(taken, torch.Tensor) and not np.shares_memory(taken.numpy(), view)
    own = np.arange(4, dtype=np.int32)  # writable and the batch's own (a join): not copied
    joined = to_model(own, torch.device("cpu"))
    assert isinstance(joined, torch.Tensor) and np.shares_memory(joined.numpy(), own)
    words = np.array([b"a"], object)
    assert to_model(words, torch.device("cpu")) is words


@pytest.mark.parametrize("datatype", ["FP16", "BYTES"])
def test_empty_like_spec_is_zeros_of_the_datatype(datatype: str) -> None:
    value = empty_like_spec(TensorSpec("x", datatype, (-1, 2)), [1, 2])
    if isinstance(value, np.ndarray):
        assert value.tolist() == [[b"", b""]]
    else:
        assert value.dtype == torch.float16 and torch.equal(value, torch.zeros(1, 2).half())


def test_tensor_bytes_counts_what_a_decoded_tensor_holds() -> None:
    assert tensor_bytes(torch.zeros(3, 4, dtype=torch.float64)) == 96
    assert tensor_bytes(np.zeros((3, 4), np.float64)) == 96
    words = np.array([b"ab", b"cde"], object)
    assert tensor_bytes(words) == words.nbytes + 5


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_outputs_on_the_gpu_are_copied_to_host_memory(device: str) -> None:
    on_gpu = torch.arange(6.0, device=device).reshape(3, 2)
    (host,) = normalize_model_outputs(on_gpu, 1)
    assert isinstance(host, np.ndarray)
    assert host.tolist() == torch.arange(6.0).reshape(3, 2).tolist()
