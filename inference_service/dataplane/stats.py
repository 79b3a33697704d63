"""Per-model inference statistics in Triton's shape (ModelStatistics), kept in memory."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    last_inference_ms: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # model runs
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))


class StatsBook:
    """Thread-safe counters for every model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, ModelStats] = defaultdict(ModelStats)

    def request(self, model: str, seconds: float, rows: int, ok: bool) -> None:
        with self._lock:
            stats = self._stats[model]
            (stats.success if ok else stats.fail).add(seconds)
            if ok:
                stats.inference_count += rows
                stats.last_inference_ms = int(time.time() * 1000)

    def execution(self, model: str, rows: int, compute_s: float, queued_s: list[float]) -> None:
        with self._lock:
            stats = self._stats[model]
            stats.execution_count += 1
            stats.compute.add(compute_s)
            stats.by_batch_size[rows].add(compute_s)
            for waited in queued_s:
                stats.queue.add(waited)

    def snapshot(self, model: str) -> ModelStats:
        with self._lock:
            stats = self._stats[model]
            return ModelStats(
                stats.last_inference_ms,
                stats.inference_count,
                stats.execution_count,
                Duration(stats.success.count, stats.success.ns),
                Duration(stats.fail.count, stats.fail.ns),
                Duration(stats.queue.count, stats.queue.ns),
                Duration(stats.compute.count, stats.compute.ns),
                {k: Duration(v.count, v.ns) for k, v in stats.by_batch_size.items()},
            )
