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
    assert torch.equal(one, torch.ones(1)) and two is words


@pytest.mark.parametrize("datatype", ["FP16", "BYTES"])
def test_empty_like_spec_is_zeros_of_the_datatype(datatype: str) -> None:
    value = empty_like_spec(TensorSpec("x", datatype, (-1, 2)), [1, 2])
    if isinstance(value, np.ndarray):
        assert value.tolist() == [[b"", b""]]
    else:
        assert value.dtype == torch.float16 and torch.equal(value, torch.zeros(1, 2).half())


def test_tensor_bytes_counts_what_a_decoded_tensor_holds() -> None:
    assert tensor_bytes(torch.zeros(3, 4, dtype=torch.float64)) == 96
    words = np.array([b"ab", b"cde"], object)
    assert tensor_bytes(words) == words.nbytes + 5


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_outputs_on_the_gpu_are_copied_to_host_memory(device: str) -> None:
    on_gpu = torch.arange(6.0, device=device).reshape(3, 2)
    (host,) = normalize_model_outputs(on_gpu, 1)
    assert isinstance(host, torch.Tensor) and host.device.type == "cpu"
    assert torch.equal(host, torch.arange(6.0).reshape(3, 2))
