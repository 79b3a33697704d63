"""Tied tensors: one tensor under several state-dict names.

A model that ties weights (an embedding and the output projection of a language model, a
parameter registered twice, a buffer that is a parameter's memory) lists the same tensor under
each name in its state dict. It travels once: a push carries it under the first of its names
and declares the others tied to that one (`__metadata__["weightsync.tied"]`,
shared/weights/layout.py); the receiver hashes and stores it under every name. Copies made of
a state keep the tie, so that a later push finds it there too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def tie_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """What two names of one tensor share: memory, dtype, shape and strides."""
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())


def ties(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each name of `state` whose tensor is one an earlier name holds, mapped to the first
    name holding it. Empty tensors hold no memory and tie nothing."""
    at: dict[int, list[str]] = {}  # by address first: most tensors have one of their own
    for name, tensor in state.items():
        if tensor.numel():
            at.setdefault(tensor.data_ptr(), []).append(name)
    tied: dict[str, str] = {}
    for names in at.values():
        if len(names) > 1:
            first: dict[tuple[object, ...], str] = {}
            for name in names:
                source = first.setdefault(tie_key(state[name]), name)
                if source != name:
                    tied[name] = source
    return tied


def tie_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The groups of names that hold one tensor, each sorted; names holding their own tensor
    are in none."""
    groups: dict[str, list[str]] = {}
    for name, source in ties(state).items():
        groups.setdefault(source, [source]).append(name)
    return [sorted(names) for names in groups.values()]


def map_tied(
    state: Mapping[str, torch.Tensor],
    fn: Callable[[str, torch.Tensor], torch.Tensor],
    tied: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """`fn(name, tensor)` of each entry of `state`, called once per tensor: a tied name gets
    what its first name got, so the result ties the same names (`tied`: `ties(state)`, where
    the caller has it already)."""
    if tied is None:
        tied = ties(state)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        source = tied.get(name)
        out[name] = out[source] if source is not None else fn(name, tensor)
    return out
