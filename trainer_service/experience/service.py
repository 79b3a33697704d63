"""Store experience batches into the trainer's buffers: the use-case behind experience.v1.

A batch is checked whole against its buffer before any of it is stored (shared/data/batch.py),
then copied out of the message, one copy per tensor, and handed as one block of samples to the
buffer's collector (`collect_batch`): the writing end PAMIQ's agent would call, whose bounded
queue the training thread empties into the buffer (DataUser.update, through the buffer's
`add_batch`).
So what a full buffer keeps is the buffer's own policy, and memory stays bounded whatever the
agents send. A batch resent after a broken call (same collector id and buffer, a sequence
already stored for them) is acknowledged without being stored twice; one whose sequence was
never stored (below the sender's highest, numbers skipped or sent out of order) is stored.

Storing a batch costs a few Python calls whatever its sample count. A sequential buffer keeps
the block and indexes into it (it drops samples oldest first: a block lives until its last
sample goes); any other buffer takes the samples one by one, each a copy of its own: a view
would keep its whole batch alive for as long as the buffer keeps that one sample (a
random-replacement buffer could keep a batch per sample it holds).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shared.data.batch import MAX_BATCH_SAMPLES, BatchSchema, Column, decode_columns
from shared.data.block import SampleBlock, block_of
from shared.data.container import DataUsersDict
from shared.errors import BufferNotFoundError, MalformedBatchError, ResourceLimitError

DEFAULT_MAX_BATCH_BYTES = 16 << 20
# Senders (collector id and buffer) remembered for resends; the least recently heard from is
# forgotten first.
MAX_COLLECTORS = 4096
# Runs of sequence numbers skipped, below a sender's highest, remembered per sender (a batch
# numbered in one is stored when it comes); beyond it the lowest run is forgotten, its numbers
# then taken for resends. A RemoteDataCollector skips numbers only for batches it dropped.
MAX_GAPS = 16
# The longest collector id: each sender remembered keeps its id, and a batch message could
# otherwise carry one of megabytes (a RemoteDataCollector's is 32 characters).
MAX_COLLECTOR_ID = 256


@dataclass(frozen=True)
class Stored:
    """What one batch stored: its buffer, the sender's number for it, the samples and payload
    bytes, and whether it was a resend of a batch stored before (then it stored nothing)."""

    buffer: str
    sequence: int
    samples: int
    payload_bytes: int
    duplicate: bool = False


class Sequences:
    """The sequence numbers one sender had stored: every number up to the highest, but for the
    runs it skipped (at most MAX_GAPS of them, the lowest forgotten first) and those below the
    first one stored."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._gaps: list[tuple[int, int]] = []  # [begin, end), ascending, all below _last

    def __contains__(self, sequence: int) -> bool:
        if self._last is None or sequence > self._last:
            return False
        return not any(begin <= sequence < end for begin, end in self._gaps)

    def add(self, sequence: int) -> None:
        """Record `sequence` stored (one not stored before)."""
        if self._last is None or sequence > self._last:
            start = 0 if self._last is None else self._last + 1
            if sequence > start:
                self._gaps.append((start, sequence))
            self._last = sequence
        else:
            at = next(i for i, (b, e) in enumerate(self._gaps) if b <= sequence < e)
            begin, end = self._gaps[at]
            self._gaps[at : at + 1] = [
                (b, e) for b, e in ((begin, sequence), (sequence + 1, end)) if b < e
            ]
        del self._gaps[: max(0, len(self._gaps) - MAX_GAPS)]


@dataclass(frozen=True)
class BufferInfo:
    """One buffer as callers see it."""

    name: str
    columns: tuple[Column, ...]
    size: int
    received: int
    max_queue_size: int


class ExperiencePlane:
    def __init__(
        self,
        users: DataUsersDict,
        schemas: Mapping[str, BatchSchema],
        max_batch_bytes: int,
        max_batch_samples: int = MAX_BATCH_SAMPLES,
    ) -> None:
        self._users = users
        self._schemas = dict(schemas)
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_samples = max_batch_samples
        self._lock = threading.Lock()
        self._received = dict.fromkeys(self._schemas, 0)
        # The sequences stored per (collector id, buffer).
        self._senders: OrderedDict[tuple[str, str], Sequences] = OrderedDict()

    def store(
        self, buffer: str, sequence: int, payload: bytes | memoryview, collector_id: str = ""
    ) -> Stored:
        """Check the batch against its buffer and hand its samples to the buffer's collector.

        Raises:
            BufferNotFoundError: There is no buffer `buffer`.
            ResourceLimitError: The payload or its sample count is over the limit.
            MalformedBatchError: The payload does not match the buffer.
        """
        schema = self.schema(buffer, sequence)
        return self.store_block(
            buffer,
            sequence,
            len(payload),
            collector_id,
            lambda: block_of(decode_columns(payload, schema, self.max_batch_samples)),
        )

    def store_block(
        self,
        buffer: str,
        sequence: int,
        size: int,
        collector_id: str,
        block: Callable[[], SampleBlock],
    ) -> Stored:
        """Hand the samples of a batch of `size` payload bytes to the buffer's collector, as
        `block()` makes them (checked against the buffer, the block's own memory), unless the
        batch was stored before.

        Raises:
            BufferNotFoundError: There is no buffer `buffer`.
            MalformedBatchError: The collector id is over MAX_COLLECTOR_ID characters.
            ResourceLimitError: The payload is over the limit; or what `block()` raises.
        """
        self.schema(buffer, sequence)  # raises if there is no such buffer
        if len(collector_id) > MAX_COLLECTOR_ID:
            raise MalformedBatchError(
                f"batch {sequence} for buffer {buffer!r}: its collector_id has "
                f"{len(collector_id)} characters; at most {MAX_COLLECTOR_ID}"
            )
        if size > self.max_batch_bytes:
            raise ResourceLimitError(
                f"batch {sequence} for buffer {buffer!r} carries {size} bytes; this trainer "
                f"takes batches of at most {self.max_batch_bytes} (--experience-max-batch): "
                "send fewer samples per batch"
            )
        sender = (collector_id, buffer)
        if self._stored_before(sender, sequence):
            return Stored(buffer, sequence, 0, size, duplicate=True)
        samples = block()
        collector = self._users.data_collectors_dict[buffer]
        with self._lock:
            if self._stored_before(sender, sequence):  # a resend on another call won
                return Stored(buffer, sequence, 0, size, duplicate=True)
            collector.collect_batch(samples)
            self._received[buffer] += samples.count
            if collector_id:
                self._senders.setdefault(sender, Sequences()).add(sequence)
                self._senders.move_to_end(sender)
                while len(self._senders) > MAX_COLLECTORS:
                    self._senders.popitem(last=False)
        return Stored(buffer, sequence, samples.count, size)

    def schema(self, buffer: str, sequence: int = 0) -> BatchSchema:
        """What the samples of `buffer` hold.

        Raises:
            BufferNotFoundError: There is no buffer `buffer` (`sequence`: the batch that asked).
        """
        schema = self._schemas.get(buffer)
        if schema is None:
            known = ", ".join(sorted(self._schemas)) or "none"
            raise BufferNotFoundError(
                f"batch {sequence}: this trainer holds no buffer named {buffer!r}; it holds: "
                f"{known}"
            )
        return schema

    def _stored_before(self, sender: tuple[str, str], sequence: int) -> bool:
        """Whether the sender (collector id, buffer) had batch `sequence` stored: its numbers
        count per buffer, so one id feeding two buffers, each numbered from 1, loses none."""
        if not sender[0]:
            return False
        stored = self._senders.get(sender)
        return stored is not None and sequence in stored

    def buffers(self) -> list[BufferInfo]:
        """Every buffer, by name."""
        with self._lock:
            received = dict(self._received)
        found = []
        for name in sorted(self._schemas):
            user = self._users[name]
            queue = user.buffer.max_queue_size
            found.append(
                BufferInfo(
                    name,
                    self._schemas[name].columns,
                    len(user),
                    received[name],
                    0 if queue is None else queue,
                )
            )
        return found
