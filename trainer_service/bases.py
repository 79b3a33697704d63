"""Host copies of recently pushed versions, which later deltas are encoded against.

An element-level encoding (shared/weights/encoding.py) describes a tensor against the bytes of
the version its target serves, so the trainer keeps those bytes: per model, the newest `KEEP`
versions it delivered to a target that may take encoded deltas. A version shares the tensors
that did not change with the one before it, so each costs only the tensors it changed; stored
tensors are never written to again, so an encoder may read one while a newer version is stored.
A delta's copy is made while its push streams (trainer_service/delivery.py), not after it.

A tensor whose last change was measured so dense that no encoding would be smaller than its
whole bytes (on any link: encoding_choice.py) is kept as a probe instead: the small sample of
its elements that the cost model measures a change on (shared/weights/encoding.py `sampled`).
While its changes stay dense, each push costs no copy of it; once a change is measured sparse
again, the next version is copied whole, and the deltas after it may travel encoded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from shared.weights.encoding import SAMPLE_ELEMENTS, sampled, sampled_share

logger = logging.getLogger(__name__)

KEEP = 2  # a target may still be at the previous version while the newest is stored
DEVICE_SPARE = 0.1  # share of a device's memory a base copy on it must leave free


def _copy(tensor: torch.Tensor, owned: bool = False) -> torch.Tensor:
    """A copy of `tensor` to encode against: on its CUDA device while memory allows, else on
    the host. An `owned` tensor (nobody writes it again) is kept itself where it may stay."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        if free - (0 if owned else 2 * nbytes) > DEVICE_SPARE * total:
            return tensor if owned else tensor.clone()
    elif owned:
        return tensor
    return tensor.to("cpu", copy=True)


def probe(tensor: torch.Tensor) -> torch.Tensor:
    """The sample of `tensor` a later version's change is measured against (a small copy)."""
    return sampled(tensor.detach(), SAMPLE_ELEMENTS).clone()


def probed_share(tensor: torch.Tensor, kept: torch.Tensor) -> float | None:
    """The share of `tensor`'s sample whose bits differ from the probe `kept` (where the probe
    lives); None where the sample is laid out otherwise (not the tensor probed)."""
    sample = sampled(tensor.detach(), SAMPLE_ELEMENTS)
    if sample.shape != kept.shape or sample.dtype != kept.dtype:
        return None
    if sample.device != kept.device:
        sample = sample.to(kept.device)
    return sampled_share(sample, kept)


@dataclass(frozen=True)
class Base:
    tensors: Mapping[str, torch.Tensor]
    hashes: Mapping[str, bytes]
    probes: Mapping[str, torch.Tensor] = field(default_factory=dict)  # kept as a sample only


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

    def probes(self, model: str, version: int) -> Mapping[str, torch.Tensor]:
        """The probes of the tensors of `version` of `model` that were kept as a sample only."""
        with self._lock:
            base = self._models.get(model, {}).get(version)
        return base.probes if base is not None else {}

    def differing(self, model: str, version: int, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """The names of `tensors` known to differ from `version` of `model` without hashing
        them: those kept as a probe whose sample of `tensors` differs from it (a few thousand
        elements each). A tensor whose sample matches may still differ elsewhere."""
        changed = set()
        for name, kept in self.probes(model, version).items():
            tensor = tensors.get(name)
            if tensor is None:
                continue
            share = probed_share(tensor, kept)
            if share is None or share > 0:  # laid out otherwise, or its sample moved
                changed.add(name)
        return changed

    def keep(
        self,
        model: str,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        hashes: Mapping[str, bytes],
        probed: Collection[str] = (),
        owned: Collection[str] = (),
    ) -> None:
        """Keep a copy of `version` (each tensor's `hashes` say which changed), the tensors
        named in `probed` as probes only and those named in `owned` (nobody writes them again)
        as they are. The tensors are copied outside the lock, so that
        encoders reading other versions are not held up; a version another caller is copying
        is waited for, not copied twice."""
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
            probes: dict[str, torch.Tensor] = {}
            copied = fresh = 0
            for name, tensor in tensors.items():
                digest = hashes.get(name)
                same = (
                    previous is not None
                    and digest is not None
                    and previous.hashes.get(name) == digest
                )
                if same and previous is not None and name in previous.tensors:
                    copy[name] = previous.tensors[name]
                elif name in probed:
                    if same and previous is not None and name in previous.probes:
                        probes[name] = previous.probes[name]
                    else:
                        probes[name] = probe(tensor)
                else:
                    copy[name] = stored = _copy(tensor, name in owned)
                    if stored.device != tensor.device or stored.data_ptr() != tensor.data_ptr():
                        copied += tensor.numel() * tensor.element_size()
                        fresh += 1
            logger.debug(
                "model %s v%d kept to encode later deltas against: %d tensor(s) copied (%d "
                "bytes), %d kept as they are or shared with the version before, %d as probes",
                model,
                version,
                fresh,
                copied,
                len(copy) - fresh,
                len(probes),
            )
            with self._lock:
                kept = self._models.setdefault(model, {})
                kept[version] = Base(copy, dict(hashes), probes)
                for old in sorted(kept)[:-KEEP]:
                    del kept[old]
        finally:
            with self._lock:
                del self._copying[key]
            done.set()
