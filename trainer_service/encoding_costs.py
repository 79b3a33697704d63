"""The cost model behind encoding_choice.py: how fast each encoding encodes and decodes on this
host (calibrated on first use, again every minute in the background, and updated by every
encode), how fast the link to each target moves bytes (measured from its recent pushes), and
what each encoding would cost a tensor on a link.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from shared.weights.encoding import ENCODINGS, SPARSE, WHOLE, decode, encode
from trainer_service import metrics

logger = logging.getLogger("trainer_service.encoding_choice")  # its lines are the chooser's

MARGIN = 0.8  # an encoding is chosen when it costs under this share of whole bytes
SMOOTHING = 0.3  # weight of the newest measurement in the running averages
RECALIBRATE_S = 60.0  # speeds measured at a busy moment must not rule encodings out for good
_CALIBRATION_ELEMENTS = 1 << 21
_CALIBRATION_CHANGED = 0.03


def average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


@dataclass
class Speeds:
    """How fast each encoding encodes and decodes on this host, and how small it makes a
    change.

    The calibration times every encoding alike, on one sample (`calibrated`): `encode` and
    `decode` are those speeds, which rank the encodings fairly against each other. Real
    encodes run on larger tensors, out of cache and beside other work, at a fraction of them:
    that fraction, `scale`, is a running average over every real encode of any encoding, and
    applies to all of them (`encode_speed`, `decode_speed`). Were each encoding's speed
    measured only when chosen, the chosen one would soon look slower than the ones left at
    their calibrated speeds, and the choice would flip to them push after push.
    `xor_ratio`: encoded bytes of an XOR encoding per changed byte, first as the calibration
    measured it, then from every real encode."""

    encode: dict[str, float] = field(default_factory=dict)  # as calibrated
    decode: dict[str, float] = field(default_factory=dict)  # as calibrated
    xor_ratio: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0  # real encodes' speed over the calibrated one
    at: float = field(default_factory=time.monotonic)  # when calibrated

    def encode_speed(self, encoding: str) -> float:
        return self.encode[encoding] * self.scale

    def decode_speed(self, encoding: str) -> float:
        return self.decode[encoding] * self.scale

    def encoded(self, encoding: str, nbytes: int, seconds: float) -> None:
        """A real encode of `nbytes` in `encoding` took `seconds`."""
        self.scale = average(self.scale, nbytes / max(seconds, 1e-9) / self.encode[encoding])

    @classmethod
    def calibrated(cls) -> Speeds:
        """Each encoding timed on a bf16 tensor with a few percent of elements changed (each
        by one unit in the last place, as small optimizer steps change bf16 weights)."""
        rng = np.random.default_rng(0)
        base = rng.integers(0, 1 << 16, _CALIBRATION_ELEMENTS, dtype=np.uint16)
        new = base.copy()
        changed = rng.random(_CALIBRATION_ELEMENTS) < _CALIBRATION_CHANGED
        new[changed] += np.uint16(1)
        new_bytes, base_bytes = new.view(np.uint8), base.view(np.uint8)
        changed_bytes = int(np.count_nonzero(changed)) * new.itemsize
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
                if encoding != SPARSE:
                    speeds.xor_ratio[encoding] = len(data) / changed_bytes
            speeds.encode[encoding] = new_bytes.nbytes / max(encoded, 1e-9)
            speeds.decode[encoding] = new_bytes.nbytes / max(decoded, 1e-9)
        logger.debug(
            "encoding speeds on this host (MB/s, encode/decode; bytes per changed byte): %s",
            ", ".join(
                f"{e} {speeds.encode[e] / 1e6:.0f}/{speeds.decode[e] / 1e6:.0f}"
                + (f" {speeds.xor_ratio[e]:.2f}" if e in speeds.xor_ratio else "")
                for e in ENCODINGS
            ),
        )
        return speeds


def estimated_bytes(
    nbytes: int, fraction: float, itemsize: int, speeds: Speeds
) -> dict[str, float]:
    """Each encoding's bytes, estimated from the share of elements that changed."""
    changed = fraction * nbytes
    return {
        SPARSE: changed + changed / itemsize * 1.1,  # values, and about a byte per gap
        **{e: changed * speeds.xor_ratio.get(e, 1.0) for e in ENCODINGS if e != SPARSE},
    }


def cheapest_encoding(
    nbytes: int, estimates: Mapping[str, float], speeds: Speeds, link: float | None
) -> str:
    assert link is not None
    costs = {
        e: nbytes / speeds.encode_speed(e) + estimates[e] / link + nbytes / speeds.decode_speed(e)
        for e in ENCODINGS
    }
    best = min(costs, key=lambda e: costs[e])
    return best if costs[best] < MARGIN * nbytes / link else WHOLE


class Calibration:
    """The encoders' speeds on this host, calibrated on first use."""

    def __init__(self) -> None:
        self._speeds: Speeds | None = None
        self._recalibrating = False
        self._lock = threading.Lock()

    def measured(self) -> Speeds | None:
        """The speeds measured so far (None: not calibrated yet), without calibrating."""
        return self._speeds

    def speeds(self) -> Speeds:
        """The speeds on this host: calibrated on first use; once a minute old, calibrated
        again in the background (a push never waits for it) and merged when done."""
        speeds = self._speeds
        if speeds is None:
            with self._lock:  # the encoding threads of a push calibrate once
                speeds = self._speeds
                if speeds is None:
                    self._speeds = speeds = Speeds.calibrated()
        elif time.monotonic() - speeds.at > RECALIBRATE_S and not self._recalibrating:
            with self._lock:
                if self._recalibrating:
                    return speeds
                self._recalibrating = True
            threading.Thread(target=self._recalibrate, name="recalibrate", daemon=True).start()
        return speeds

    def _recalibrate(self) -> None:
        try:
            fresh = Speeds.calibrated()
            speeds = self._speeds
            if speeds is not None:  # what real encodes measured stays
                fresh.scale = speeds.scale
                fresh.xor_ratio = speeds.xor_ratio
            self._speeds = fresh
        finally:
            self._recalibrating = False


class Links:
    """The rate of the link to each target, a running average of its recent pushes."""

    def __init__(self) -> None:
        self._rates: dict[str, float] = {}  # target address -> bytes/s

    def rate(self, address: str) -> float | None:
        return self._rates.get(address)

    def describe(self, address: str) -> str:
        rate = self._rates.get(address)
        return "not measured yet" if rate is None else f"{rate / 1e6:.1f} MB/s"

    def record(self, address: str, nbytes: int, seconds: float) -> None:
        """A push of `nbytes` payload bytes to `address` took `seconds` end to end."""
        if nbytes >= 1 << 16 and seconds > 0:  # small pushes measure latency, not the link
            rate = average(self._rates.get(address), nbytes / seconds)
            self._rates[address] = rate
            metrics.LINK_RATE.labels(address).set(rate)
