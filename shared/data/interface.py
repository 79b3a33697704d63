"""PAMIQ-Core's DataCollector and DataUser: the two ends of a buffer.

A collector is the writing end: any thread (the agent's, a gRPC thread of the experience plane)
calls `collect(sample)`, which stamps the sample with the time and queues it, at most
`max_queue_size` of them (the oldest dropped beyond). The user is the reading end, on the
training thread: `update()` moves what was queued into the buffer, sample by sample, and keeps
each one's stamp, so that a trainer can ask how many arrived since its last run
(`count_data_added_since`). The two threads share only the queue, swapped under a lock.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from threading import RLock
from typing import Any, Generic, TypeVar

from typing_extensions import override

from shared.data.buffer import DataBuffer
from shared.data.clock import now
from shared.state import PersistentStateMixin

T = TypeVar("T")
R = TypeVar("R")

TIMESTAMPS_FILE = "timestamps.json"


class TimestampingQueue(Generic[T]):
    """A queue of samples, each with the time it was appended."""

    def __init__(self, max_len: int | None = None) -> None:
        """Initialize the queue.

        Args:
            max_len: The most samples held; appending beyond drops the oldest. None: no limit.
        """
        self._queue: deque[T] = deque(maxlen=max_len)
        self._timestamps: deque[float] = deque(maxlen=max_len)

    def append(self, data: T) -> None:
        """Append a sample stamped with the current time."""
        self._queue.append(data)
        self._timestamps.append(now())

    def popleft(self) -> tuple[T, float]:
        """Remove and return the oldest sample and its time.

        Raises:
            IndexError: The queue is empty.
        """
        return self._queue.popleft(), self._timestamps.popleft()

    def __len__(self) -> int:
        return len(self._timestamps)


class DataCollector(Generic[T]):
    """The writing end of a buffer: thread-safe `collect`."""

    def __init__(self, max_queue_size: int | None) -> None:
        """Initialize the collector.

        Args:
            max_queue_size: The most samples queued until the user's next update (the oldest
                are dropped beyond); None: no limit.
        """
        self._max_queue_size = max_queue_size
        self._queue = TimestampingQueue[T](max_queue_size)
        self._lock = RLock()

    def collect(self, data: T) -> None:
        """Queue one sample for the buffer (thread-safe).

        Args:
            data: The sample.
        """
        with self._lock:
            self._queue.append(data)

    def _move_data(self) -> TimestampingQueue[T]:
        """Hand over everything queued and start a new queue (for the DataUser only)."""
        with self._lock:
            out, self._queue = self._queue, TimestampingQueue[T](self._max_queue_size)
        return out


class DataUser(PersistentStateMixin, Generic[R]):
    """The reading end of a buffer, for trainers: `get_data()`, `len()`, and how much is new."""

    def __init__(self, buffer: DataBuffer[Any, R]) -> None:
        """Initialize the user of `buffer`, and the collector that feeds it.

        Args:
            buffer: The buffer.
        """
        self._buffer = buffer
        self._timestamps: deque[float] = deque(maxlen=buffer.max_queue_size)
        # Only this user and DataUsersDict reach the collector.
        self._collector = DataCollector[Any](buffer.max_queue_size)

    @property
    def buffer(self) -> DataBuffer[Any, R]:
        """The buffer this user reads."""
        return self._buffer

    def update(self) -> None:
        """Move every sample the collector queued into the buffer, keeping their times."""
        queue = self._collector._move_data()
        for _ in range(len(queue)):
            data, t = queue.popleft()
            self._buffer.add(data)
            self._timestamps.append(t)

    def get_data(self) -> R:
        """Update, then return the buffer's data (`DataBuffer.get_data`)."""
        self.update()
        return self._buffer.get_data()

    def count_data_added_since(self, timestamp: float) -> int:
        """How many samples were collected after `timestamp` (and moved in by `update`).

        Samples the buffer's policy then dropped count too: this counts additions. Only the
        last `max_queue_size` additions are remembered.

        Args:
            timestamp: A time from `shared.data.clock.now()`.

        Returns:
            The number of samples stamped later than `timestamp`.
        """
        for i, t in enumerate(reversed(self._timestamps)):
            if t <= timestamp:
                return i
        return len(self._timestamps)

    @override
    def save_state(self, path: Path) -> None:
        """Update, then save the buffer into `path/buffer` and the times into
        `path/timestamps.json`.

        Args:
            path: The user's state directory (created; it may exist).
        """
        self.update()
        path.mkdir(parents=True, exist_ok=True)
        self._buffer.save_state(path / "buffer")
        (path / TIMESTAMPS_FILE).write_text(json.dumps(list(self._timestamps)), encoding="utf-8")

    @override
    def load_state(self, path: Path) -> None:
        """Load what `save_state` saved.

        Args:
            path: The user's state directory.

        Raises:
            ValueError: The times file is not a list of numbers.
        """
        self._buffer.load_state(path / "buffer")
        times = json.loads((path / TIMESTAMPS_FILE).read_text(encoding="utf-8"))
        if not isinstance(times, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in times
        ):
            raise ValueError(f"{path / TIMESTAMPS_FILE} is not a list of times")
        self._timestamps = deque((float(t) for t in times), maxlen=self._buffer.max_queue_size)

    def __len__(self) -> int:
        """How many samples the buffer holds (as of the last update)."""
        return len(self._buffer)
