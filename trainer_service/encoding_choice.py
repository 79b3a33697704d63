"""Which encoding each changed tensor of a delta travels in, from a cost model of its link.

For one tensor of n bytes, on a link that moves L bytes/s to its target:

    whole:     n / L
    encoding:  n / encode_speed + estimated_bytes / L + n / decode_speed

and the cheapest wins; an encoding must beat whole bytes by a margin (so a push is never slower
than whole bytes on its link), and one that turns out no smaller travels whole after all. L is
measured per target from its recent pushes (payload bytes over the push's seconds less the
time the target says it took after the push's last message, which the model charges apart;
a running average), the speeds on this host by a small calibration on first use (repeated
every minute in the background, so speeds measured at a busy moment do not rule the encodings
out for good and no push waits for it), scaled alike by what every real encode reaches against
it; the estimated bytes come from the fraction of changed elements in a sample of the tensor
(for the XOR encodings, times their bytes per changed byte, calibrated, then measured).
Tensors on a CUDA device are compared there (shared/weights/encoding.py `encode_tensor`): only
the changed positions and values travel to the host. Several targets that take the same
version on the same base share one encode of each tensor (the encoded bytes are kept for the
newest version of each model until a newer one comes). On loopback the wire outruns every
encoder, so `auto` never keeps a base copy for a loopback target and sends
whole bytes. `--push-encoding` forces one encoding where a base exists (bench and tests).

A push's tensors are chosen and encoded on up to ENCODE_THREADS threads. A tensor whose change
was measured so dense that no encoding's estimated bytes come under MARGIN of its whole bytes
is named `dense`: on no link would an encoding be chosen for it, so the next version keeps only
a probe of it (bases.py), on which the change after is measured in turn.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from shared.weights.encoding import (
    ENCODINGS,
    SAMPLE_ELEMENTS,
    SPARSE,
    WHOLE,
    changed_share,
    encode_tensor,
    host_bytes,
)
from trainer_service import metrics
from trainer_service.bases import probed_share
from trainer_service.encoding_costs import (
    MARGIN,
    Calibration,
    Links,
    Speeds,
    average,
    cheapest_encoding,
    estimated_bytes,
)
from trainer_service.names import is_loopback
from trainer_service.push import PushPlan

logger = logging.getLogger(__name__)

AUTO = "auto"
CHOICES = (AUTO, WHOLE, *ENCODINGS)
# A push's tensors are encoded on this many threads (numpy and the compressors let go of the
# GIL while they work), so an encode takes the host's spare cores rather than one.
ENCODE_THREADS = min(os.cpu_count() or 1, 4)


__all__ = ["AUTO", "CHOICES", "Encoded", "EncodingChooser", "Speeds", "host_bytes"]


def changed_fraction(new: torch.Tensor, base: torch.Tensor) -> float:
    """The share of elements that differ in a sample of evenly spaced blocks."""
    return changed_share(new, base, SAMPLE_ELEMENTS)


class _Choice(NamedTuple):
    """How one tensor travels: its encoding, the encoded bytes (None: whole), whether another
    target's push made them, and whether its change was measured too dense for any encoding
    to be smaller (None: not measured)."""

    encoding: str
    data: bytes | None
    reused: bool
    dense: bool | None


_WHOLE = _Choice(WHOLE, None, False, None)


@dataclass
class _Shared:
    """One tensor's encoding, made once for every target that takes the same version on the
    same base: the first to need it encodes, the others wait for it."""

    encoding: str
    ready: threading.Event = field(default_factory=threading.Event)
    data: bytes | None = None


# (model, version, base version): the push whose tensors may be shared between targets
PushKey = tuple[str, int, int]


@dataclass(frozen=True)
class Encoded:
    """The tensors of one payload that travel encoded, and what encoding cost."""

    tensors: dict[str, tuple[str, bytes]]
    chosen: dict[str, str]  # every tensor considered -> its encoding (WHOLE included)
    seconds: float
    reused: int = 0  # tensors whose encoding another target's push made
    # tensors whose change was measured so dense that no encoding would be smaller than their
    # whole bytes, on any link: a probe of them is base enough (bases.py)
    dense: frozenset[str] = frozenset()

    def summary(self) -> str:
        """How many tensors took each encoding, e.g. `sparse=12 whole=2 (12 reused)`."""
        counts: dict[str, int] = {}
        for encoding in self.chosen.values():
            counts[encoding] = counts.get(encoding, 0) + 1
        text = " ".join(f"{e}={n}" for e, n in sorted(counts.items())) or "no tensors"
        return f"{text} ({self.reused} reused)" if self.reused else text


class EncodingChooser:
    """Chooses and runs the encodings of delta payloads for one trainer (thread-safe enough:
    the running averages are floats updated by whole assignments)."""

    def __init__(self, mode: str = AUTO) -> None:
        if mode not in CHOICES:
            raise ValueError(f"push encoding {mode!r} is not one of {', '.join(CHOICES)}")
        self.mode = mode
        self._links = Links()
        self._loopback: dict[str, bool] = {}
        self._calibration = Calibration()
        self._shared_lock = threading.Lock()
        # model -> (version, {(base version, tensor): its encoding})
        self._shared: dict[str, tuple[int, dict[tuple[int, str], _Shared]]] = {}
        # model -> the tensors whose last measured change was dense (kept as probes)
        self._dense: dict[str, frozenset[str]] = {}

    def dense(self, model: str) -> frozenset[str]:
        """The tensors of `model` whose last measured change was too dense for any encoding:
        the next version keeps only a probe of them (bases.py)."""
        return self._dense.get(model, frozenset())

    def wants_bases(self, address: str) -> bool:
        """Whether deltas to `address` may travel encoded, so a base copy is worth keeping."""
        if self.mode == WHOLE:
            return False
        if self.mode != AUTO:
            return True
        if address not in self._loopback:
            self._loopback[address] = is_loopback(address)
        return not self._loopback[address]

    def describe_link(self, address: str) -> str:
        return self._links.describe(address)

    def record_push(self, address: str, nbytes: int, seconds: float) -> None:
        """A push of `nbytes` payload bytes to `address` took `seconds` end to end."""
        self._links.record(address, nbytes, seconds)

    def pushed(self, plan: PushPlan, address: str, seconds: float, finish_s: float = 0.0) -> None:
        """`plan` was pushed to `address` and committed in `seconds`, of which the target spent
        `finish_s` after the push's last message (PushResponse.finish_seconds): measure the
        link, count the bytes by encoding, and log how the tensors travelled (debug).

        The link is measured on the push's stream: its seconds less the target's after the
        last message, when it decodes what is left, checks and commits (and the hops after it
        commit). The cost model charges decoding on its own; counted in, a small delta's
        seconds, mostly that, made a 1 Gbit/s link look a fifth as fast as it is. A target
        that does not say (finish_s 0) is measured on the push's seconds less the time its
        encoded tensors take to decode as this host decodes them, which overstates the link
        where the target decodes while the stream goes on (up to three times here)."""
        payload = plan.payload
        counts: dict[str, int] = {}
        decoding = 0.0
        speeds = self._calibration.measured()
        for entry in payload.entries:
            encoding = entry.encoding or WHOLE
            metrics.WIRE_BYTES.labels(plan.model_name, encoding).inc(entry.end - entry.begin)
            counts[encoding] = counts.get(encoding, 0) + 1
            if entry.encoding is not None and speeds is not None:
                decoding += entry.layout.nbytes / speeds.decode_speed(entry.encoding)
        after = finish_s if 0 < finish_s < seconds else decoding
        if seconds - after > seconds / 10:  # else what came after is no guide
            self.record_push(address, payload.nbytes, seconds - after)
        logger.debug(
            "model %s v%d (%s) committed on %s: %d payload bytes in %.3fs, %.3fs of them after "
            "its stream (link %s); tensors: %s",
            plan.model_name,
            plan.version,
            f"delta on {plan.base_version}" if plan.base_version else "full",
            address,
            payload.nbytes,
            seconds,
            finish_s,
            self.describe_link(address),
            " ".join(f"{e}={n}" for e, n in sorted(counts.items())) or "none",
        )

    def encode(
        self,
        address: str,
        tensors: Sequence[tuple[str, torch.Tensor]],
        base: Mapping[str, torch.Tensor],
        push: PushKey | None = None,
        probes: Mapping[str, torch.Tensor] | None = None,
    ) -> Encoded:
        """Encode those of `tensors` that the cost model (or the forced mode) picks, against
        `base` (a tensor kept as a probe only, in `probes`, has its change measured and
        travels whole), on up to ENCODE_THREADS threads. `push` names the model, version and
        base: a tensor another target's push of it encoded already (the same way) is not
        encoded again."""
        started = time.perf_counter()
        probes = probes or {}

        def choose(item: tuple[str, torch.Tensor]) -> _Choice:
            name, tensor = item
            return self._one(address, name, tensor, base.get(name), probes.get(name), push)

        if ENCODE_THREADS > 1 and len(tensors) > 1:
            with ThreadPoolExecutor(
                min(ENCODE_THREADS, len(tensors)), thread_name_prefix="encode"
            ) as pool:
                choices = list(pool.map(choose, tensors))
        else:
            choices = [choose(item) for item in tensors]
        chosen: dict[str, str] = {}
        out: dict[str, tuple[str, bytes]] = {}
        reused = 0
        dense: set[str] = set()
        measured: set[str] = set()
        for (name, _), choice in zip(tensors, choices, strict=True):
            chosen[name] = choice.encoding
            reused += choice.reused
            if choice.data is not None:
                out[name] = (choice.encoding, choice.data)
            if choice.dense is not None:
                measured.add(name)
                if choice.dense:
                    dense.add(name)
        if push is not None:  # what the next version keeps of each tensor (bases.py)
            self._dense[push[0]] = (self.dense(push[0]) - measured) | dense
        return Encoded(out, chosen, time.perf_counter() - started, reused, frozenset(dense))

    def _one(
        self,
        address: str,
        name: str,
        tensor: torch.Tensor,
        base: torch.Tensor | None,
        probe: torch.Tensor | None,
        push: PushKey | None,
    ) -> _Choice:
        if self.mode == WHOLE or tensor.element_size() not in (1, 2, 4, 8):
            return _WHOLE
        if base is None and probe is not None:
            return self._probed(address, tensor, probe)
        if base is None or base.shape != tensor.shape or base.dtype != tensor.dtype:
            return _WHOLE
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return _WHOLE
        link = self._links.rate(address)
        if self.mode == AUTO and link is None:
            return _WHOLE  # nothing measured yet: the first pushes measure it
        speeds = self._calibration.speeds()
        if self.mode == AUTO and link is not None:
            cheapest = min(
                nbytes / speeds.encode_speed(e) + nbytes / speeds.decode_speed(e) for e in ENCODINGS
            )
            if cheapest >= MARGIN * nbytes / link:
                return _WHOLE  # no encoding can pay, however small (fast links)
        if base.device != tensor.device:  # a base kept on the host for a CUDA tensor
            tensor = tensor.to(base.device)
        fraction: float | None = None
        dense: bool | None = None
        if self.mode == AUTO:
            fraction = changed_fraction(tensor, base)
            estimates = estimated_bytes(nbytes, fraction, tensor.element_size(), speeds)
            dense = min(estimates.values()) >= MARGIN * nbytes
            encoding = cheapest_encoding(nbytes, estimates, speeds, link)
        else:
            encoding = self.mode
        if encoding == WHOLE:
            return _Choice(WHOLE, None, False, dense)
        # An encoding another target's push made already costs nothing more to make: it is
        # taken whichever encoding this link would have chosen, as long as it is not whole.
        shared, mine = self._shared_slot(push, name, encoding)
        if shared is not None and not mine:
            shared.ready.wait()
            if shared.data is None:
                return _Choice(WHOLE, None, False, dense)
            return _Choice(shared.encoding, shared.data, True, dense)
        data = None
        try:
            data = self._encode(encoding, tensor, base, speeds, fraction)
        finally:
            if shared is not None:
                shared.data = data
                shared.ready.set()
        return _Choice(WHOLE if data is None else encoding, data, False, dense)

    def _probed(self, address: str, tensor: torch.Tensor, probe: torch.Tensor) -> _Choice:
        """A tensor whose base is a probe travels whole; in `auto` its change is measured on
        the probe, so that a change no longer dense has the next version kept whole."""
        if self.mode != AUTO or self._links.rate(address) is None:
            return _Choice(WHOLE, None, False, None)
        share = probed_share(tensor, probe)
        if share is None:
            return _Choice(WHOLE, None, False, None)
        nbytes = tensor.numel() * tensor.element_size()
        estimates = estimated_bytes(
            nbytes, share, tensor.element_size(), self._calibration.speeds()
        )
        return _Choice(WHOLE, None, False, min(estimates.values()) >= MARGIN * nbytes)

    def _encode(
        self,
        encoding: str,
        tensor: torch.Tensor,
        base: torch.Tensor,
        speeds: Speeds,
        fraction: float | None,
    ) -> bytes | None:
        nbytes = tensor.numel() * tensor.element_size()
        began, cpu = time.perf_counter(), time.thread_time()
        data = encode_tensor(encoding, tensor, base)
        seconds = time.perf_counter() - began
        metrics.ENCODE_CPU_SECONDS.labels(encoding).inc(time.thread_time() - cpu)
        speeds.encoded(encoding, nbytes, seconds)
        metrics.ENCODE_SECONDS.labels(encoding).inc(seconds)
        metrics.ENCODED_BYTES.labels(encoding).inc(nbytes)
        if data is not None and encoding != SPARSE:
            if fraction is None:
                fraction = changed_fraction(tensor, base)
            if fraction > 0:
                ratio = len(data) / (fraction * nbytes)
                speeds.xor_ratio[encoding] = average(speeds.xor_ratio.get(encoding), ratio)
        return data

    def _shared_slot(
        self, push: PushKey | None, name: str, encoding: str
    ) -> tuple[_Shared | None, bool]:
        """The shared encoding of tensor `name` in `push`, and whether this caller makes it (in
        `encoding`). Only the newest version of each model is shared; older ones encode on
        their own."""
        if push is None:
            return None, True
        model, version, base_version = push
        with self._shared_lock:
            current = self._shared.get(model)
            if current is None or current[0] < version:
                current = (version, {})
                self._shared[model] = current
            elif current[0] > version:
                return None, True
            slot = current[1].get((base_version, name))
            if slot is not None:
                return slot, False
            slot = current[1][(base_version, name)] = _Shared(encoding)
            return slot, True

    def calibrate(self) -> Speeds:
        """Time the encoders on this host now (else on the first tensor that may take one)."""
        return self._calibration.speeds()
