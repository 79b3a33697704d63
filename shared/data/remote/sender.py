"""The sending half of a RemoteDataCollector: the thread that batches what `collect()` queued
and streams it to the trainer holding the buffer.

A thread of the collector's own gathers samples into batches (up to `batch_size` samples, or
what came within `max_delay_s`) and streams them to the experience plane (experience.v1
`Collect`) of the trainer that holds the buffer (route.py), keeping each batch until the trainer
acknowledges it and sending it again on a new call if the call broke first (the trainer stores a
resent batch once: batches carry this collector's id and a sequence number). A full slab leaves
as it is (its memory is the message, pending.py); fewer rows are framed into a message of their
own (wire.py), split to the trainer's limit on batches. At most `max_in_flight` batches wait for
an acknowledgement. A call with nothing to send for `idle_close_s` is ended; a broken one is made
again, found anew, after a backoff of up to `retry_max_s`.

A process forked while a collector is open (`os.fork`, multiprocessing's fork) gets a copy of it
without its thread and with gRPC's connections unusable: in the child it refuses `collect()` and
`flush()` with a RuntimeError saying so, and `close()` returns at once (the parent's collector
sends what it holds, once). A collector whose `close()` gave up waiting closes its connections
at once, which ends its call and any wait on a trainer that stopped answering.

`Sender` holds the state both halves share, all of it guarded by `_lock`; collector.py adds the
agent's calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Sequence

import grpc
import torch

from shared.data.batch import MAX_BATCH_SAMPLES
from shared.data.remote.call import Call, refused, status
from shared.data.remote.pending import Pending
from shared.data.remote.route import Route, split_addresses
from shared.data.remote.samples import CollectorStats
from shared.data.remote.wire import Framed, frame
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.grpc.auth import TlsFiles

logger = logging.getLogger(__name__)

# The largest message the channel sends: a batch is split to fit the trainer's own limit.
MAX_MESSAGE_BYTES = 256 << 20
DROP_LOG_INTERVAL_S = 10.0

# Every sender of this process: a forked child marks its copies (see `_forked`).
_OPEN: weakref.WeakSet[Sender] = weakref.WeakSet()


class Sender:
    """The sending thread of a collector for `buffer` at `address`, and the state it shares with
    the agent's calls (`_lock` guards all of it)."""

    def __init__(
        self,
        address: str | Sequence[str],
        buffer: str,
        *,
        token: str | None,
        tls: TlsFiles | None,
        server_name: str | None,
        batch_size: int,
        max_delay_s: float,
        max_in_flight: int,
        timeout_s: float,
        retry_max_s: float,
        idle_close_s: float,
    ) -> None:
        self.addresses = split_addresses(address)
        self.address = ",".join(self.addresses)
        self.buffer = buffer
        self.collector_id = uuid.uuid4().hex
        self._pid = os.getpid()  # the process whose thread sends (a fork's copy sends nothing)
        self._fork_of: int | None = None  # in a forked child: the pid of the process it copied
        self._batch_size = batch_size
        self._max_delay_s = max_delay_s
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
        self._last_drop_log = self._last_trouble_log = float("-inf")
        self._thread = threading.Thread(target=self._run, name="experience-send", daemon=True)
        _OPEN.add(self)
        self._thread.start()  # last: it reads all of the above

    def _forked(self) -> None:
        """In a child forked from the process that opened this collector: no thread sends
        here, the lock may have been held by one at the fork, and gRPC's objects must not be
        touched (closing a channel there can block forever). Make it a closed copy."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._fork_of = self._pid
        self._closing = True

    def _refuse_closed(self) -> None:
        """Raise RuntimeError, saying why, if this collector takes no more samples (the lock
        held)."""
        if self._fork_of is not None:
            raise RuntimeError(
                f"this RemoteDataCollector was opened in process {self._fork_of}, and this "
                f"process ({os.getpid()}) is a fork of it: its sending thread and connections "
                "stay with that process; open a RemoteDataCollector in this one"
            )
        if self._closing:
            raise RuntimeError("this RemoteDataCollector is closed")

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
            if self._abandoned:  # close() gave up on the trainer: it may never answer again
                call.cancel()
            else:
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
            if self._closing and self._abandoned:  # close() closes the channels: none to call
                return False
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
            if take and not batches:  # all dropped (each larger than the trainer takes)
                self._changed.notify_all()  # flush() may be waiting for these alone
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
        """Why the trainer cannot be reached (logged, at most once every DROP_LOG_INTERVAL_S:
        a collector retries every few seconds)."""
        self._problem = self._last_error = problem
        self._changed.notify_all()  # collect_rows() waits for room only while there is none
        now = time.monotonic()
        if now - self._last_trouble_log >= DROP_LOG_INTERVAL_S:
            self._last_trouble_log = now
            logger.warning(
                "buffer %s at %s: %s; %d sample(s) waiting",
                self.buffer,
                self.address,
                problem,
                self._queued + sum(b.samples for b in self._unacked),
            )

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


def _after_fork_in_child() -> None:
    for sender in list(_OPEN):
        sender._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
