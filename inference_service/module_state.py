"""The tensors of a served copy of a model, by name, looked up once per copy.

The service holds two copies of each model's module (live and standby), and a push writes into
a copy's tensors in place: a copy keeps the same tensors for as long as it lives. So its state
dict is made once and kept beside it; walking the module for it on every push (three times a
push, sync plane and swap) cost more than a small delta of a model with thousands of tensors
did otherwise.

A model's forward may write its own buffers while it serves (a running normaliser, a counter,
BatchNorm left in train mode), as PAMIQ's inference models may between syncs. What a version
committed is then no longer in the live copy: `committed_state` keeps it, for everything that
reads a version's bytes rather than serving it (the next push's base, the history, a Seed).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

_STATES: weakref.WeakKeyDictionary[nn.Module, Mapping[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)
_BUFFERS: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def state_of(module: nn.Module) -> Mapping[str, torch.Tensor]:
    """`module.state_dict()` (read-only), made on the first call for `module`; it goes when
    the module does."""
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = MappingProxyType(module.state_dict())
    return state


def buffer_names(module: nn.Module) -> frozenset[str]:
    """The names in `state_of(module)` that are buffers (its persistent ones), found on the
    first call for `module`."""
    found = _BUFFERS.get(module)
    if found is None:
        state = state_of(module)
        named = module.named_buffers(remove_duplicate=False)
        found = _BUFFERS[module] = frozenset(name for name, _ in named if name in state)
    return found


def committed_state(module: nn.Module) -> Mapping[str, torch.Tensor]:
    """`state_of(module)` as it is now, its buffers copied (read-only): what a version committed,
    however its forward writes the module's own buffers afterwards."""
    state = state_of(module)
    buffers = buffer_names(module)
    if not buffers:
        return state
    with torch.no_grad():
        return MappingProxyType({**state, **{name: state[name].clone() for name in buffers}})
