"""What a served model takes and returns, per OIP tensor, free of protobuf.

A model takes and returns torch tensors, except for BYTES tensors, which have no torch dtype:
those are numpy arrays of `bytes` objects (dtype object, the tensor's shape), as Triton's Python
backend hands them; a model may return them as numpy arrays of `bytes` or `str`.

On their way, a request's tensors travel as numpy arrays wherever numpy has their dtype (all
but BF16): an input as a read-only view of the request's raw bytes (or the array its typed
values were read into), an output as the host array of the model's result. Torch tensors are
made and dropped on the model's thread (`to_model`, `normalize_model_outputs`), once per batch,
never per request on the event loop: there, making and freeing a tensor per request cost the
loop more than the rest of decoding (the service took about 16% less CPU a request without it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from shared.app import TensorSpec
from shared.dtypes import BY_OIP, BY_TORCH, BYTES, dtype_of

# What a model takes and returns per OIP tensor: a torch tensor, or for BYTES a numpy array;
# on the way to and from it, a numpy array of the tensor's dtype where numpy has it.
Tensor: TypeAlias = "torch.Tensor | np.ndarray[Any, Any]"


def _numpy_dtypes() -> dict[torch.dtype, np.dtype[Any]]:
    """The OIP datatypes' torch dtypes that numpy and torch.from_numpy share (not BF16)."""
    found: dict[torch.dtype, np.dtype[Any]] = {}
    for entry in BY_OIP.values():
        if entry.torch_dtype is None:
            continue
        try:
            array = torch.empty(0, dtype=entry.torch_dtype).numpy()
            if torch.from_numpy(array).dtype == entry.torch_dtype:
                found[entry.torch_dtype] = array.dtype
        except TypeError:  # no numpy dtype
            continue
    return found


NUMPY_DTYPES = _numpy_dtypes()
# The OIP datatype of each numpy dtype above
OIP_OF_NUMPY = {array: BY_TORCH[dtype].oip for dtype, array in NUMPY_DTYPES.items()}


def is_array(value: object) -> bool:
    """Whether `value` is a numpy array of numbers (not a BYTES tensor's array of objects)."""
    return isinstance(value, np.ndarray) and value.dtype != object


def to_model(value: object, device: torch.device) -> object:
    """An input as the model takes it: a numpy array of numbers as a tensor of its own on
    `device` (a read-only view of a request's bytes copied first: the model must not see the
    message's memory), a tensor moved there, anything else (a BYTES array) as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if not isinstance(value, np.ndarray) or value.dtype == object:
        return value
    tensor = torch.from_numpy(value if value.flags.writeable else value.copy())
    return tensor.to(device, non_blocking=True)


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
    if is_array(tensor):
        return int(tensor.nbytes)
    if isinstance(tensor, np.ndarray):
        return int(tensor.nbytes) + sum(len(e) for e in tensor.reshape(-1).tolist())
    return tensor.nelement() * tensor.element_size()


def normalize_model_outputs(result: object, n_outputs: int) -> list[Tensor]:
    """A model's return value (one tensor, or a tuple/list of them; a numpy array stands for a
    BYTES output) as the list of its outputs, every torch tensor in host memory, as a numpy
    array where numpy has its dtype.

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
    return [_on_host(t) if isinstance(t, torch.Tensor) else t for t in tensors]


def _on_host(tensor: torch.Tensor) -> Tensor:
    host = tensor.detach().cpu()
    # a lazily negated view (torch._neg_view, or what some operators return) has no numpy form
    return host.resolve_neg().numpy() if host.dtype in NUMPY_DTYPES else host
