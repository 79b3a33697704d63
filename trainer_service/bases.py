"""Host copies of recently pushed versions, which later deltas are encoded against.

An element-level encoding (shared/weights/encoding.py) describes a tensor against the bytes of
the version its target serves, so the trainer keeps those bytes: per model, the newest `KEEP`
versions it delivered to a target that may take encoded deltas. A version shares the tensors
that did not change with the one before it, so each costs only the tensors it changed; stored
tensors are never written to again, so an encoder may read one while a newer version is stored.
A delta's copy is made while its push streams (trainer_service/delivery.py), not after it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

KEEP = 2  # a target may still be at the previous version while the newest is stored
DEVICE_SPARE = 0.1  # share of a device's memory a base copy on it must leave free


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` to encode against: on its CUDA device while memory allows, else on
    the host."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        if free - 2 * nbytes > DEVICE_SPARE * total:
            return tensor.clone()
    return tensor.to("cpu", copy=True)


@dataclass(frozen=True)
class Base:
    tensors: Mapping[str, torch.Tensor]
    hashes: Mapping[str, bytes]


class Bases:
    """The versions deltas may be encoded against, per model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, Base]] = {}
        self._copying: dict[tuple[str, int], threading.Event] = {}  # copies being made

    def get(self, model: str, version: int) -> Mapping[str, torch.Tensor] | None:
        """The tensors of `version` of `model`, if kept."""
        with self._lock:
            base = self._models.get(model, {}).get(version)
        return base.tensors if base is not None else None

    def keep(
        self,
        model: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        hashes: Mapping[str, bytes],
    ) -> None:
        """Keep a copy of `version` (each tensor's `hashes` say which changed). The tensors are
        copied outside the lock, so that encoders reading other versions are not held up; a
        version another caller is copying is waited for, not copied twice."""
        key = (model, version)
        while True:
            with self._lock:
                kept = self._models.setdefault(model, {})
                if version in kept:
                    return
                other = self._copying.get(key)
                if other is None:
                    done = self._copying[key] = threading.Event()
                    older = [v for v in kept if v < version]
                    previous = kept[max(older)] if older else None
                    break
            other.wait()  # it may have failed: then this caller copies
        try:
            copy: dict[str, torch.Tensor] = {}
            for name, tensor in tensors.items():
                digest = hashes.get(name)
                if (
                    previous is not None
                    and digest is not None
                    and previous.hashes.get(name) == digest
                    and name in previous.tensors
                ):
                    copy[name] = previous.tensors[name]
                else:
                    copy[name] = _copy(tensor)
            with self._lock:
                kept = self._models.setdefault(model, {})
                kept[version] = Base(copy, dict(hashes))
                for old in sorted(kept)[:-KEEP]:
                    del kept[old]
        finally:
            with self._lock:
                del self._copying[key]
            done.set()
