"""The RemoteDataCollector: PAMIQ's `collect()` on the agent, batches streamed to a trainer.

A thread of the collector's own gathers samples into batches (up to `batch_size` samples, or
what came within `max_delay_s`) and streams them to the experience plane (experience.v1
`Collect`) of the trainer that holds the buffer (route.py), keeping each batch until the trainer
acknowledges it and sending it again on a new call if the call broke first (the trainer stores a
resent batch once: batches carry this collector's id and a sequence number).

`collect` never waits for the network or the trainer: under a lock that the sending thread holds
only to take rows, it copies the sample's tensors into the next row of a slab (pending.py), so a
batch leaves already stacked. While the trainer is away samples wait, at most `max_pending` of
them taking at most `max_pending_bytes`; beyond that the oldest are dropped, logged and counted
in `stats.dropped`, as are the samples of a batch the trainer refuses (it names why:
`stats.last_error`), and a sample larger than `max_pending_bytes` alone. Memory is bounded by
those samples (in slabs of whole batches) plus `max_in_flight` batches, each within the
trainer's limit on batches. `flush()` waits until every sample collected
so far is acknowledged or dropped; `close()` flushes, then stops. Samples still waiting when the
process ends without `close()` are lost; acknowledged ones are the trainer's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch

from shared.data.batch import MAX_BATCH_SAMPLES
from shared.data.remote.call import Call, refused, status
from shared.data.remote.pending import Pending
from shared.data.remote.route import Route, split_addresses
from shared.data.remote.samples import CollectorStats, Layout, describe, layout_of, sample_bytes
from shared.data.remote.wire import Framed, frame
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.auth import TlsFiles

logger = logging.getLogger(__name__)

# The largest message the channel sends: a batch is split to fit the trainer's own limit.
MAX_MESSAGE_BYTES = 256 << 20
# The most bytes of samples waiting for the trainer, by default (a trainer away for a while).
MAX_PENDING_BYTES = 64 << 20
DROP_LOG_INTERVAL_S = 10.0


class RemoteDataCollector:
    def __init__(
        self,
        address: str | Sequence[str],
        buffer: str,
        *,
        token: str | None = None,
        tls: TlsFiles | None = None,
        server_name: str | None = None,
        batch_size: int = 64,
        max_delay_s: float = 0.05,
        max_pending: int = 10_000,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        max_in_flight: int = 4,
        timeout_s: float = 10.0,
        retry_max_s: float = 5.0,
        idle_close_s: float = 30.0,
    ) -> None:
        """Collect samples for the buffer `buffer` of the trainer, among those at `address`,
        that holds it.

        Args:
            address: The trainer's experience plane, HOST:PORT; or several (a list, or
                comma-separated), or a name that resolves to several: the samples go to the
                one that holds the buffer (trainers split an app's trainer groups between
                them), found again whenever a call breaks.
            buffer: The buffer's name (as the app declares it).
            token: The experience plane's bearer token.
            tls: Connect over TLS (mutual with a client certificate), verifying the trainer as
                `server_name` when `address` names it otherwise.
            batch_size: The most samples per batch.
            max_delay_s: How long a sample waits for a batch to fill before it goes anyway.
            max_pending: The most samples waiting to be sent; the oldest go beyond.
            max_pending_bytes: The most bytes the samples waiting to be sent take; the oldest
                go beyond (a sample larger than this is dropped when collected).
            max_in_flight: The most batches sent and not yet acknowledged.
            timeout_s: How long the trainer has to acknowledge a batch, or to answer at all,
                before the call counts as broken and is made again.
            retry_max_s: The longest wait between two attempts to reach the trainer.
            idle_close_s: A call with nothing to send for this long is ended (it holds one of
                the trainer's stream slots).
        """
        if min(batch_size, max_pending, max_pending_bytes, max_in_flight) < 1:
            raise ValueError(
                "batch_size, max_pending, max_pending_bytes and max_in_flight must be at least 1"
            )
        self.addresses = split_addresses(address)
        self.address = ",".join(self.addresses)
        self.buffer = buffer
        self.collector_id = uuid.uuid4().hex
        self._batch_size = batch_size
        self._max_delay_s = max_delay_s
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._pending_limit = max_pending  # in samples, both bounds (set by the first sample)
        self._max_in_flight = max_in_flight
        self._timeout_s = timeout_s
        self._retry_max_s = retry_max_s
        self._idle_close_s = idle_close_s
        self._route = Route(
            self.addresses,
            MAX_MESSAGE_BYTES,
            token=token,
            tls=tls,
            server_name=server_name,
            timeout_s=timeout_s,
        )
        self.holder: str | None = None  # the address of the trainer last found holding it
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: Pending | None = None  # the samples to send (from the first collected)
        self._unacked: deque[Framed] = deque()  # in sequence order; sent or to (re)send
        self._in_transit = 0  # samples taken from _pending, not yet in a batch of _unacked
        self._sequence = 0
        self._collected = self._acknowledged_samples = self._dropped = 0
        self._last_error: str | None = None
        self._problem: str | None = None  # why the trainer cannot be reached, until it acks
        self._call: Call | None = None
        self._limits: tuple[int, int] | None = None  # the trainer's (max bytes, max samples)
        self._closing = False
        self._abandoned = False  # closed before the trainer took everything: drop what is left
        self._flushing = 0
        self._last_drop_log = float("-inf")
        self._full = ""
        self._thread = threading.Thread(target=self._run, name="experience-send", daemon=True)
        self._thread.start()

    # The agent's side.

    def collect(self, data: Mapping[str, Any]) -> None:
        """Queue one sample for the trainer's buffer; returns without waiting for the network.

        Args:
            data: The sample: each of the buffer's tensor names to a tensor, numpy array or
                number (copied here: the caller may reuse its memory at once).

        Raises:
            ValueError: The sample's names, dtypes or shapes differ from the first sample's.
            RuntimeError: The collector is closed.
        """
        with self._lock:
            if self._closing:
                raise RuntimeError("this RemoteDataCollector is closed")
            pending = self._pending
            if pending is None:
                pending = self._pending = self._start(layout_of(data))
            if not self._pending_limit:
                self._too_large(data, pending)
                return
            try:
                full = pending.put(data)
            except ValueError as exc:
                first = describe(pending.layout)
                why = f"sample differs from the first one collected, {first}: {exc}"
                raise ValueError(why) from None
            self._collected += 1
            if pending.count > self._pending_limit:
                pending.drop_oldest()
                self._drop(1, self._full)
            if full:  # a batch is full: wake the sender
                self._changed.notify_all()

    def _start(self, layout: Layout) -> Pending:
        """The queue of samples laid out as the first one collected, within both bounds."""
        size = sample_bytes(layout)
        by_bytes = self._max_pending_bytes // size if size else self._max_pending
        self._pending_limit = min(self._max_pending, by_bytes)
        self._full = (
            f"the queue of samples waiting for the trainer is full: {self._pending_limit} "
            f"samples of {size} bytes (max_pending {self._max_pending}, max_pending_bytes "
            f"{self._max_pending_bytes})"
        )
        capacity = min(self._batch_size, max(1, self._pending_limit))
        return Pending(layout, capacity, self.buffer, self.collector_id)

    def _too_large(self, data: Mapping[str, Any], pending: Pending) -> None:
        """Drop a sample larger than max_pending_bytes (after checking it as `put` would)."""
        if layout_of(data) != pending.layout:
            first = describe(pending.layout)
            raise ValueError(f"sample differs from the first one collected, {first}")
        self._collected += 1
        self._drop(
            1,
            f"a sample takes {sample_bytes(pending.layout)} bytes; the collector holds at most "
            f"max_pending_bytes {self._max_pending_bytes} of samples waiting",
        )

    @property
    def stats(self) -> CollectorStats:
        with self._lock:
            return self._stats()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every sample collected so far is acknowledged or dropped.

        Returns:
            Whether it came to that within `timeout` seconds (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._flushing += 1
            self._changed.notify_all()
            try:
                while self._queued or self._unacked or self._in_transit:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._changed.wait(left)
                return True
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = 10.0) -> CollectorStats:
        """Flush for up to `timeout` seconds, then stop (what still waits is dropped); return
        the final stats."""
        flushed = self.flush(timeout)
        with self._lock:
            self._closing = True
            if not flushed:
                self._abandoned = True
                left = sum(b.samples for b in self._unacked)
                left += self._pending.clear() if self._pending else 0
                self._unacked.clear()
                if left:
                    self._drop(left, "the collector closed before the trainer acknowledged them")
            self._changed.notify_all()
        self._thread.join(self._timeout_s)
        self._route.close()
        return self.stats

    def __enter__(self) -> RemoteDataCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The sending thread's side; `_lock` guards everything below.

    def _run(self) -> None:
        delay = 0.1
        while True:
            with self._lock:
                work = self._wait_for_work()
                if work is None:
                    break
            if work == "connect":
                if self._connect():
                    delay = 0.1
                    continue
                with self._lock:
                    self._changed.wait_for(lambda: self._closing, delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            self._send()
        call = self._call
        if call is not None:
            call.finish()
            call.join(self._timeout_s)

    def _wait_for_work(self) -> str | None:
        """Block until there is something to do: 'connect', 'send', or None to stop."""
        idle_since = time.monotonic()
        while True:
            if self._closing and (self._abandoned or not (self._queued or self._unacked)):
                return None
            now = time.monotonic()
            call = self._call
            if call is not None and call.ended:
                self._call = call = None
            wake = 1.0
            if self._unacked or self._queued:
                idle_since = now
                if call is None:
                    return "connect"
                sent_at = self._unacked[0].sent_at if self._unacked else None
                if call.ending:
                    pass  # wait for its end, then connect again
                elif sent_at is not None and now - sent_at > self._timeout_s:
                    self._trouble(
                        f"the trainer at {self.holder} acknowledged nothing for "
                        f"{self._timeout_s:g}s"
                    )
                    call.cancel()  # its end comes back through _ended
                elif any(b.sent_at is None for b in self._unacked) or self._batch_due(now):
                    return "send"
                else:
                    wake = self._next_wake(now)
            elif call is not None and not call.ending:
                if now - idle_since >= self._idle_close_s:
                    call.finish()  # nothing to send for a while: give the stream slot back
                else:
                    wake = min(wake, self._idle_close_s - (now - idle_since))
            self._changed.wait(max(0.001, wake))

    def _batch_due(self, now: float) -> bool:
        pending = self._pending
        if not pending or not pending.count or len(self._unacked) >= self._max_in_flight:
            return False
        return (
            pending.count >= self._batch_size
            or now - pending.oldest >= self._max_delay_s
            or self._flushing > 0
            or self._closing
        )

    def _next_wake(self, now: float) -> float:
        waits = [1.0]
        if self._pending and self._pending.count and len(self._unacked) < self._max_in_flight:
            waits.append(self._max_delay_s - (now - self._pending.oldest))
        if self._unacked and self._unacked[0].sent_at is not None:
            waits.append(self._timeout_s - (now - self._unacked[0].sent_at))
        return max(0.001, min(waits))

    def _connect(self) -> bool:
        """Find the trainer holding the buffer, learn its limits and open a call; False (and
        why) if none can be had."""
        found = self._route.find(self.buffer)
        with self._lock:
            if isinstance(found, str):
                self._trouble(found)
                return False
            self.holder = found.address
            self._limits = (found.max_batch_bytes, found.max_batch_samples)
            for batch in self._unacked:
                batch.sent_at = None  # every batch not acknowledged goes again, in order
            self._call = Call(found.collect, self._acknowledged, self._ended)
        return True

    def _send(self) -> None:
        """Send what is due on the current call: batches to resend first, then a new one."""
        with self._lock:
            call = self._call
            if call is None or call.ending:
                return
            resend = [b for b in self._unacked if b.sent_at is None]
            columns: dict[str, torch.Tensor] = {}
            pending, take, emptied = self._pending, 0, None
            if not resend and pending is not None and self._batch_due(time.monotonic()):
                limits = self._limits or (None, MAX_BATCH_SAMPLES)
                most = min(self._batch_size, limits[1])
                whole = pending.take_whole(most, limits[0])
                if whole is not None:  # the slab is the message: nothing to join
                    self._sequence += 1
                    batch = Framed(
                        self._sequence, whole.capacity, whole.seal(self._sequence), slab=whole
                    )
                    self._unacked.append(batch)
                    resend = [batch]
                else:
                    columns, take, emptied = pending.take(most)
                    self._in_transit = take
        batches = self._encode(columns, take)
        with self._lock:
            self._in_transit = 0
            if pending is not None:
                pending.reuse(emptied)  # the batch is framed: its rows may be filled again
            if self._abandoned:
                if take:
                    self._drop(take, "the collector closed before they were sent")
                return
            self._unacked.extend(batches)  # kept whatever happens next: a later call resends
        for batch in [*resend, *batches]:
            with self._lock:
                if self._call is not call or call.ending or batch not in self._unacked:
                    return  # the call ended meanwhile: the next one sends the rest
                batch.sent_at = time.monotonic()
                # Queued under the lock: once acknowledged, a batch's slab may be filled again.
                call.requests.put(batch.message)

    @property
    def _queued(self) -> int:
        return self._pending.count if self._pending else 0

    def _encode(self, columns: dict[str, torch.Tensor], count: int) -> list[Framed]:
        """Samples as batches within the trainer's byte limit."""
        max_bytes = self._limits[0] if self._limits else None
        batches = []
        for item in frame(columns, count, max_bytes, self.buffer, self.collector_id, self._next):
            if isinstance(item, Framed):
                batches.append(item)
            else:
                with self._lock:
                    self._drop(1, str(item))
        return batches

    def _next(self) -> int:
        with self._lock:
            self._sequence += 1
            return self._sequence

    # Called on a call's receiving thread.

    def _acknowledged(self, ack: pb.BatchAck) -> None:
        with self._lock:
            if self._unacked and self._unacked[0].sequence == ack.sequence:
                batch = self._unacked.popleft()
                self._acknowledged_samples += batch.samples
                self._problem = None
                self._release(batch)
                self._changed.notify_all()

    def _release(self, batch: Framed) -> None:
        """A batch acknowledged or dropped: its slab, if it is one, may be filled again."""
        if batch.slab is not None and self._pending is not None:
            self._pending.reuse(batch.slab)

    def _ended(self, call: Call, error: grpc.RpcError | None) -> None:
        with self._lock:
            call.ended = True
            if error is not None and self._unacked and refused(error):
                batch = self._unacked.popleft()  # the trainer refused it: it never will take it
                self._release(batch)
                self._drop(batch.samples, f"the trainer refused a batch: {status(error)}")
            elif error is not None and self._unacked:
                self._trouble(f"the trainer at {self.holder}: {status(error)}")
            self._changed.notify_all()

    def _trouble(self, problem: str) -> None:
        self._problem = self._last_error = problem

    def _drop(self, count: int, why: str) -> None:
        self._dropped += count
        cause = f" ({self._problem})" if self._problem else ""
        self._last_error = f"dropped {count} sample(s): {why}{cause}"
        self._changed.notify_all()
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            logger.warning(
                "buffer %s at %s: %s; %d sample(s) dropped so far",
                self.buffer,
                self.address,
                self._last_error,
                self._dropped,
            )

    def _stats(self) -> CollectorStats:
        in_flight = sum(b.samples for b in self._unacked)
        return CollectorStats(
            self._collected,
            self._acknowledged_samples,
            self._dropped,
            self._queued + self._in_transit + in_flight,
            self._last_error,
        )
