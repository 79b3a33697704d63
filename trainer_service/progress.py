"""A push's progress on the terminal (bytes, rate, ETA), for pushes big enough to wait on."""

from __future__ import annotations

import sys
import time
from typing import TextIO

MiB = 1 << 20


class Progress:
    """Redraws one status line at most every `interval` seconds; `done()` ends it."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, interval: float = 0.5
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.interval = interval
        self.sent = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def advance(self, nbytes: int) -> None:
        self.sent += nbytes
        now = time.monotonic()
        if now - self._drawn >= self.interval:
            self._drawn = now
            self._draw(now)

    def done(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.sent / elapsed
        eta = (self.total - self.sent) / rate if rate else float("inf")
        self.stream.write(
            f"\r{self.label}: {self.sent / MiB:,.0f}/{self.total / MiB:,.0f} MiB "
            f"{rate / 1e6:,.0f} MB/s ETA {eta:4.0f}s"
        )
        self.stream.flush()


def wants_progress(total: int, threshold: int = 64 * MiB) -> bool:
    """Show progress when someone is watching (stderr is a terminal) and the push is large."""
    return total >= threshold and sys.stderr.isatty()
