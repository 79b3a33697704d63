"""What a served model takes and returns, per OIP tensor, free of protobuf.

A model takes and returns torch tensors, except for BYTES tensors, which have no torch dtype:
those are numpy arrays of `bytes` objects (dtype object, the tensor's shape), as Triton's Python
backend hands them; a model may return them as numpy arrays of `bytes` or `str`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from shared.app import TensorSpec
from shared.dtypes import BYTES, dtype_of

# What a model takes and returns per OIP tensor: a torch tensor, or for BYTES a numpy array.
Tensor: TypeAlias = "torch.Tensor | np.ndarray[Any, Any]"


def bytes_array(elements: Sequence[bytes], shape: Sequence[int]) -> np.ndarray[Any, Any]:
    """A numpy object array of `bytes` with the given shape."""
    array = np.empty(len(elements), dtype=object)
    array[:] = list(elements)
    return array.reshape(tuple(shape))


def empty_like_spec(spec: TensorSpec, shape: Sequence[int]) -> Tensor:
    """Zeros of the spec's datatype (empty strings for BYTES)."""
    if spec.datatype == BYTES:
        return bytes_array([b""] * math.prod(shape), shape)
    return torch.zeros(list(shape), dtype=dtype_of(spec.datatype))


def tensor_bytes(tensor: Tensor) -> int:
    """The memory a decoded request tensor holds (BYTES: a reference per element and their
    bytes)."""
    if isinstance(tensor, np.ndarray):
        return int(tensor.nbytes) + sum(len(e) for e in tensor.reshape(-1).tolist())
    return tensor.nelement() * tensor.element_size()


def normalize_model_outputs(result: object, n_outputs: int) -> list[Tensor]:
    """A model's return value (one tensor, or a tuple/list of them; a numpy array stands for a
    BYTES output) as the list of its outputs, every torch tensor in host memory.

    Called where the model ran (its batcher's thread or a worker), so the device-to-host copy
    waits for the model's kernels there, and the event loop only ever encodes host memory."""
    if isinstance(result, (torch.Tensor, np.ndarray)):
        items: list[object] = [result]
    elif isinstance(result, (tuple, list)):
        items = list(result)
    else:
        raise RuntimeError(
            f"the model returned a {type(result).__name__}; return a Tensor or a tuple of Tensors"
        )
    tensors = [t for t in items if isinstance(t, (torch.Tensor, np.ndarray))]
    if len(items) != n_outputs or len(tensors) != len(items):
        raise RuntimeError(
            f"the model returned {len(items)} value(s) but declares {n_outputs} output tensor(s)"
        )
    return [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in tensors]
