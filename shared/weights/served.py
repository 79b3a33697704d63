"""The dtype a model's inference copy runs in (`served_dtype`, shared/app.py), on both sides.

The trainer converts each floating tensor of a version before hashing and pushing it; the
inference service converts its module's floating parameters and buffers once, when it builds
the model. Both apply the same rule, `t.to(served_dtype)` for floating tensors and nothing for
the rest (integer, bool and complex tensors travel as they are), so the served weights are
bit-exact to the trained ones converted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shared.weights.ties import map_tied


def served_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as it is served: converted when it is floating and `dtype` is given."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


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
