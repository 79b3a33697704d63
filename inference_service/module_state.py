"""The tensors of a served copy of a model, by name, looked up once per copy.

The service holds two copies of each model's module (live and standby), and a push writes into
a copy's tensors in place: a copy keeps the same tensors for as long as it lives. So its state
dict is made once and kept beside it; walking the module for it on every push (three times a
push, sync plane and swap) cost more than a small delta of a model with thousands of tensors
did otherwise.
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


def state_of(module: nn.Module) -> Mapping[str, torch.Tensor]:
    """`module.state_dict()` (read-only), made on the first call for `module`; it goes when
    the module does."""
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = MappingProxyType(module.state_dict())
    return state
