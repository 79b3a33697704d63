"""PAMIQ-Core's DataCollector and DataUser: the two ends of a buffer.

A collector is the writing end: any thread (the agent's, a gRPC thread of the experience plane)
calls `collect(sample)`, which stamps the sample with the time and queues it, at most
`max_queue_size` of them (the oldest dropped beyond); `collect_batch(block)` queues a block of
samples at once (the experience plane's batches). The user is the reading end, on the training
thread: `update()` moves what was queued into the buffer (a block through the buffer's
`add_batch`) and keeps each one's stamp, so that a trainer can ask how many arrived since its
last run (`count_data_added_since`). The two threads share only the queue, swapped under a lock.
"""

from __future__ import annotations

import json
from collections import deque
from itertools import repeat
from pathlib import Path
from threading import RLock
from typing import Any, Generic, TypeVar

from typing_extensions import override

from shared.data.block import SampleBlock, is_block
from shared.data.buffer import DataBuffer
from shared.data.clock import now
from shared.state import PersistentStateMixin

T = TypeVar("T")
R = TypeVar("R")

TIMESTAMPS_FILE = "timestamps.json"


class TimestampingQueue(Generic[T]):
    """A queue of samples, each with the time it was appended; a block of samples (appended
    with `append_block`) is one entry, its samples sharing its time."""

    def __init__(self, max_len: int | None = None) -> None:
        """Initialize the queue.

        Args:
            max_len: The most samples held; appending beyond drops the oldest (a block's
                oldest samples first). None: no limit.
        """
        self._max_len = max_len
        self._queue: deque[Any] = deque()  # samples, and blocks of them
        self._timestamps: deque[float] = deque()
        self._count = 0

    def append(self, data: T) -> None:
        """Append a sample stamped with the current time."""
        self._queue.append(data)
        self._timestamps.append(now())
        self._count += 1
        self._trim()

    def append_block(self, block: SampleBlock) -> None:
        """Append a block of samples, all stamped with the current time."""
        if block.count:
            self._queue.append(block)
            self._timestamps.append(now())
            self._count += block.count
            self._trim()

    def _trim(self) -> None:
        if self._max_len is None:
            return
        while self._count > self._max_len:
            first = self._queue[0]
            over = self._count - self._max_len
            if is_block(first) and first.count > over:
                self._queue[0] = first.tail(over)
                self._count -= over
            else:
                self._queue.popleft()
                self._timestamps.popleft()
                self._count -= first.count if is_block(first) else 1

    def popleft(self) -> tuple[T | SampleBlock, float]:
        """Remove and return the oldest entry (a sample, or a block of them) and its time.

        Raises:
            IndexError: The queue is empty.
        """
        data = self._queue.popleft()
        self._count -= data.count if is_block(data) else 1
        return data, self._timestamps.popleft()

    @property
    def entries(self) -> int:
        """How many entries (samples and blocks) it holds."""
        return len(self._timestamps)

    def __len__(self) -> int:
        """How many samples it holds."""
        return self._count


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

    def collect_batch(self, block: SampleBlock) -> None:
        """Queue the samples of `block` for the buffer, as `collect` would one by one but at
        the cost of one (thread-safe); the user's update hands the block to the buffer's
        `add_batch`.

        Args:
            block: The samples, as columns (the block's own memory).
        """
        with self._lock:
            self._queue.append_block(block)

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
        for _ in range(queue.entries):
            data, t = queue.popleft()
            if is_block(data):
                self._buffer.add_batch(data)
                self._timestamps.extend(repeat(t, data.count))
            else:
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
