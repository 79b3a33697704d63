"""Which encoding each changed tensor of a delta travels in, from a cost model of its link.

For one tensor of n bytes, on a link that moves L bytes/s to its target:

    whole:     n / L
    encoding:  n / encode_speed + estimated_bytes / L + n / decode_speed

and the cheapest wins; an encoding must beat whole bytes by a margin (so a push is never slower
than whole bytes on its link), and one that turns out no smaller travels whole after all. L is
measured per target from its recent pushes (payload bytes over the push's seconds, a running
average), the speeds on this host by a small calibration on first use (repeated every minute,
so speeds measured at a busy moment do not rule the encodings out for good) and from every
encode; the estimated bytes come from the fraction of changed elements in a sample of the
tensor. On loopback the wire outruns every encoder, so `auto` never keeps a base copy for a
loopback target and sends whole bytes. `--push-encoding` forces one encoding where a base
exists (bench and tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.weights.encoding import ENCODINGS, SPARSE, WHOLE, decode, encode, words
from trainer_service import metrics
from trainer_service.push import PushPlan
from trainer_service.targets import is_loopback

logger = logging.getLogger(__name__)

AUTO = "auto"
CHOICES = (AUTO, WHOLE, *ENCODINGS)
MARGIN = 0.8  # an encoding is chosen when it costs under this share of whole bytes
SMOOTHING = 0.3  # weight of the newest measurement in the running averages
RECALIBRATE_S = 60.0  # speeds measured at a busy moment must not rule encodings out for good
_SAMPLE_BLOCKS = 16
_SAMPLE_BLOCK = 4096  # elements
_CALIBRATION_ELEMENTS = 1 << 21
_CALIBRATION_CHANGED = 0.03


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array on the host (a view for a contiguous CPU one)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


@dataclass
class Speeds:
    """Bytes of tensor per second each encoding encodes and decodes on this host."""

    encode: dict[str, float] = field(default_factory=dict)
    decode: dict[str, float] = field(default_factory=dict)
    # encoded bytes of XOR encodings per changed byte, as measured (1.0 until then)
    xor_ratio: dict[str, float] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # when calibrated

    @classmethod
    def calibrated(cls) -> Speeds:
        """Each encoding timed on a bf16 tensor with a few percent of elements changed."""
        rng = np.random.default_rng(0)
        base = rng.integers(0, 1 << 16, _CALIBRATION_ELEMENTS, dtype=np.uint16)
        new = base.copy()
        changed = rng.random(_CALIBRATION_ELEMENTS) < _CALIBRATION_CHANGED
        new[changed] ^= np.uint16(1)
        new_bytes, base_bytes = new.view(np.uint8), base.view(np.uint8)
        speeds = cls()
        out = np.empty_like(new_bytes)
        for encoding in ENCODINGS:
            encoded = decoded = float("inf")
            for _ in range(2):  # the faster of two: the first pays for warming up
                started = time.perf_counter()
                data = encode(encoding, new_bytes, base_bytes, 2)
                encoded = min(encoded, time.perf_counter() - started)
                assert data is not None
                started = time.perf_counter()
                decode(encoding, data, base_bytes, 2, out)
                decoded = min(decoded, time.perf_counter() - started)
            speeds.encode[encoding] = new_bytes.nbytes / max(encoded, 1e-9)
            speeds.decode[encoding] = new_bytes.nbytes / max(decoded, 1e-9)
        logger.debug(
            "encoding speeds on this host (MB/s, encode/decode): %s",
            ", ".join(
                f"{e} {speeds.encode[e] / 1e6:.0f}/{speeds.decode[e] / 1e6:.0f}" for e in ENCODINGS
            ),
        )
        return speeds


def changed_fraction(new: np.ndarray, base: np.ndarray, itemsize: int) -> float:
    """The share of elements that differ in a sample of evenly spaced blocks."""
    a, b = words(new, itemsize), words(base, itemsize)
    if len(a) <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
        return float(np.count_nonzero(a != b)) / max(len(a), 1)
    step = len(a) // _SAMPLE_BLOCKS
    differ = sum(
        int(np.count_nonzero(a[s : s + _SAMPLE_BLOCK] != b[s : s + _SAMPLE_BLOCK]))
        for s in range(0, step * _SAMPLE_BLOCKS, step)
    )
    return differ / (_SAMPLE_BLOCKS * _SAMPLE_BLOCK)


@dataclass(frozen=True)
class Encoded:
    """The tensors of one payload that travel encoded, and what encoding cost."""

    tensors: dict[str, tuple[str, bytes]]
    chosen: dict[str, str]  # every tensor considered -> its encoding (WHOLE included)
    seconds: float

    def summary(self) -> str:
        """How many tensors took each encoding, e.g. `sparse=12 whole=2`."""
        counts: dict[str, int] = {}
        for encoding in self.chosen.values():
            counts[encoding] = counts.get(encoding, 0) + 1
        return " ".join(f"{e}={n}" for e, n in sorted(counts.items())) or "no tensors"


class EncodingChooser:
    """Chooses and runs the encodings of delta payloads for one trainer (thread-safe enough:
    the running averages are floats updated by whole assignments)."""

    def __init__(self, mode: str = AUTO) -> None:
        if mode not in CHOICES:
            raise ValueError(f"push encoding {mode!r} is not one of {', '.join(CHOICES)}")
        self.mode = mode
        self._links: dict[str, float] = {}  # target address -> bytes/s
        self._loopback: dict[str, bool] = {}
        self._speeds: Speeds | None = None

    def wants_bases(self, address: str) -> bool:
        """Whether deltas to `address` may travel encoded, so a base copy is worth keeping."""
        if self.mode == WHOLE:
            return False
        if self.mode != AUTO:
            return True
        if address not in self._loopback:
            self._loopback[address] = is_loopback(address)
        return not self._loopback[address]

    def link_rate(self, address: str) -> float | None:
        return self._links.get(address)

    def describe_link(self, address: str) -> str:
        rate = self._links.get(address)
        return "not measured yet" if rate is None else f"{rate / 1e6:.1f} MB/s"

    def record_push(self, address: str, nbytes: int, seconds: float) -> None:
        """A push of `nbytes` payload bytes to `address` took `seconds` end to end."""
        if nbytes >= 1 << 16 and seconds > 0:  # small pushes measure latency, not the link
            rate = _average(self._links.get(address), nbytes / seconds)
            self._links[address] = rate
            metrics.LINK_RATE.labels(address).set(rate)

    def pushed(self, plan: PushPlan, address: str, seconds: float) -> None:
        """`plan` was pushed to `address` and committed in `seconds`: measure the link, count
        the bytes by encoding, and log how the tensors travelled (debug)."""
        payload = plan.payload
        self.record_push(address, payload.nbytes, seconds)
        counts: dict[str, int] = {}
        for entry in payload.entries:
            encoding = entry.encoding or WHOLE
            metrics.WIRE_BYTES.labels(plan.model_name, encoding).inc(entry.end - entry.begin)
            counts[encoding] = counts.get(encoding, 0) + 1
        logger.debug(
            "model %s v%d (%s) committed on %s: %d payload bytes in %.3fs (link %s); tensors: %s",
            plan.model_name,
            plan.version,
            f"delta on {plan.base_version}" if plan.base_version else "full",
            address,
            payload.nbytes,
            seconds,
            self.describe_link(address),
            " ".join(f"{e}={n}" for e, n in sorted(counts.items())) or "none",
        )

    def encode(
        self,
        address: str,
        tensors: Sequence[tuple[str, torch.Tensor]],
        base: Mapping[str, torch.Tensor],
    ) -> Encoded:
        """Encode those of `tensors` that the cost model (or the forced mode) picks."""
        started = time.perf_counter()
        chosen: dict[str, str] = {}
        out: dict[str, tuple[str, bytes]] = {}
        for name, tensor in tensors:
            encoding, data = self._one(address, tensor, base.get(name))
            chosen[name] = encoding
            if data is not None:
                out[name] = (encoding, data)
        return Encoded(out, chosen, time.perf_counter() - started)

    def _one(
        self, address: str, tensor: torch.Tensor, base: torch.Tensor | None
    ) -> tuple[str, bytes | None]:
        if self.mode == WHOLE or base is None or base.shape != tensor.shape:
            return WHOLE, None
        if base.dtype != tensor.dtype or tensor.element_size() not in (1, 2, 4, 8):
            return WHOLE, None
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return WHOLE, None
        link = self._links.get(address)
        if self.mode == AUTO and link is None:
            return WHOLE, None  # nothing measured yet: the first pushes measure it
        speeds = self._calibrated()
        if self.mode == AUTO and link is not None:
            cheapest = min(nbytes / speeds.encode[e] + nbytes / speeds.decode[e] for e in ENCODINGS)
            if cheapest >= MARGIN * nbytes / link:
                return WHOLE, None  # no encoding can pay, however small (loopback-fast links)
        new_bytes, base_bytes = host_bytes(tensor), host_bytes(base)
        itemsize = tensor.element_size()
        encoding = (
            self.mode
            if self.mode != AUTO
            else self._cheapest(new_bytes, base_bytes, itemsize, speeds, link)
        )
        if encoding == WHOLE:
            return WHOLE, None
        began = time.perf_counter()
        data = encode(encoding, new_bytes, base_bytes, itemsize)
        seconds = time.perf_counter() - began
        speeds.encode[encoding] = _average(speeds.encode[encoding], nbytes / max(seconds, 1e-9))
        metrics.ENCODE_SECONDS.labels(encoding).inc(seconds)
        if data is None:
            return WHOLE, None
        if encoding != SPARSE:
            fraction = changed_fraction(new_bytes, base_bytes, itemsize)
            if fraction > 0:
                ratio = len(data) / (fraction * nbytes)
                speeds.xor_ratio[encoding] = _average(speeds.xor_ratio.get(encoding), ratio)
        return encoding, data

    def _cheapest(
        self,
        new: np.ndarray,
        base: np.ndarray,
        itemsize: int,
        speeds: Speeds,
        link: float | None,
    ) -> str:
        assert link is not None
        nbytes = len(new)
        fraction = changed_fraction(new, base, itemsize)
        changed = fraction * nbytes
        estimates = {
            SPARSE: changed + changed / itemsize * 1.1,  # values, and about a byte per gap
            **{e: changed * speeds.xor_ratio.get(e, 1.0) for e in ENCODINGS if e != SPARSE},
        }
        costs = {
            e: nbytes / speeds.encode[e] + estimates[e] / link + nbytes / speeds.decode[e]
            for e in ENCODINGS
        }
        best = min(costs, key=lambda e: costs[e])
        return best if costs[best] < MARGIN * nbytes / link else WHOLE

    def calibrate(self) -> Speeds:
        """Time the encoders on this host now (else on the first tensor that may take one)."""
        return self._calibrated()

    def _calibrated(self) -> Speeds:
        speeds = self._speeds
        if speeds is None or time.monotonic() - speeds.at > RECALIBRATE_S:
            fresh = Speeds.calibrated()
            if speeds is not None:  # what encodes measured stays in the running averages
                for encoding in ENCODINGS:
                    fresh.encode[encoding] = _average(
                        speeds.encode[encoding], fresh.encode[encoding]
                    )
                fresh.xor_ratio = speeds.xor_ratio
            self._speeds = speeds = fresh
        return speeds
