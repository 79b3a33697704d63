"""The dtype a model's inference copy runs in (`served_dtype`, shared/app.py), on both sides.

The trainer converts each floating tensor of a version before hashing and pushing it; the
inference service converts its module's floating parameters and buffers once, when it builds
the model. Both apply the same rule, `t.to(served_dtype)` for floating tensors and nothing for
the rest (integer, bool and complex tensors travel as they are), so the served weights are
bit-exact to the trained ones converted.

The trainer converts every version anew, into memory an earlier version's conversion left
(`ServedCasts`): freshly allocated, a 128 MiB conversion took a page fault per page it wrote on
every other sync or so (glibc gives that much freed memory back to the system), 40 to 150 ms
against 10 to 50 ms on two cores; written into memory that stays mapped, none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch
from torch import nn

from shared.weights.ties import map_tied, ties

# How many references a storage has (the inductor's CUDA graph trees ask the same before they
# reuse memory); where a torch lacks it, every conversion takes fresh memory.
_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def served_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` is served in: `dtype` when it is given and the tensor floating, else
    the tensor's own (the one rule both sides apply)."""
    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return dtype


def served_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as it is served: converted when it is floating and `dtype` is given."""
    target = served_dtype(tensor, dtype)
    return tensor if tensor.dtype == target else tensor.to(target)


def served_state(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Every tensor of `state` as it is served, each converted once (tied names stay tied)."""
    return map_tied(state, lambda _, t: served_tensor(t, dtype))


def serve_module(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Convert `module`'s floating parameters and buffers to `dtype` in place; return it."""
    if dtype is not None:
        module._apply(lambda t: served_tensor(t, dtype))  # type: ignore[no-untyped-call]
    return module


class ServedCasts:
    """`served_state` of one model's successive versions, each CPU tensor converted into the
    memory of an earlier version's that nothing refers to any more: the trainer hands its
    versions over to the pushes (as base copies and catch-up snapshots, trainer_service/
    bases.py and hostcopy.py), and once every holder has let go of one, its memory takes the
    next version's values. What is handed out is a view of memory kept here, so whether
    anything still refers to it is its storage's reference count: the view itself, and any
    view, numpy array or byte view made of it, holds one. At most `sets` conversions of each
    tensor are kept; memory still referred to when a newer one pushes it out is freed by its
    last holder. Tensors on a GPU convert as `served_state` does (its caching allocator
    reuses memory already).

    Three are kept: the two versions the pushes' base copies hold, and the one the next
    conversion is written into; between syncs the host holds one served copy of the model more
    than the pushes need."""

    def __init__(self, dtype: torch.dtype | None, sets: int = 3) -> None:
        self.dtype = dtype
        self._sets = sets
        self._kept: dict[tuple[int, ...], list[torch.Tensor]] = {}  # by shape, oldest first
        self._lock = threading.Lock()  # two syncs of the model must not take the same memory

    def state(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of `weights` as it is served (tied names stay tied), converted
        tensors in recycled memory where some is free."""
        shapes: dict[tuple[int, ...], int] = {}  # tensors of each shape, each once
        tied = ties(weights)
        for name, tensor in weights.items():
            if name not in tied:
                shape = tuple(tensor.shape)
                shapes[shape] = shapes.get(shape, 0) + 1
        with self._lock:
            return map_tied(weights, lambda _, t: self._convert(t, shapes), tied)

    def _convert(self, tensor: torch.Tensor, shapes: Mapping[tuple[int, ...], int]) -> torch.Tensor:
        dtype = served_dtype(tensor, self.dtype)
        if tensor.dtype == dtype:
            return tensor
        if _use_count is None or tensor.device.type != "cpu" or tensor.is_sparse:
            return tensor.to(dtype)
        shape = tuple(tensor.shape)
        kept = self._kept.setdefault(shape, [])
        memory = next((m for m in kept if _unshared(m)), None)
        if memory is None:
            memory = torch.empty(shape, dtype=dtype)
            kept.append(memory)
            del kept[: -self._sets * shapes[shape]]
        with torch.no_grad():
            memory.copy_(tensor.detach())  # the same conversion as `to` (bit for bit)
        return memory.view(shape)


def _unshared(memory: torch.Tensor) -> bool:
    """Whether nothing but `memory` itself refers to its storage (the storage object made to
    ask holds one reference more)."""
    assert _use_count is not None
    return _use_count(memory.untyped_storage()._cdata) == 2
