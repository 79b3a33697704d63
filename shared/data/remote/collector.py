"""The RemoteDataCollector: PAMIQ's `collect()` on the agent, batches streamed to a trainer.

`collect` never waits for the network or the trainer: under a lock that the sending thread
(sender.py) holds only to take rows, it copies the sample's tensors into the next row of a slab
(pending.py), so a batch leaves already stacked; `collect_rows` does the same for many samples
at once, one copy per tensor per slab of rows. While the trainer is away samples wait, at most
`max_pending` of them taking at most `max_pending_bytes`; beyond that the oldest are dropped,
logged and counted in `stats.dropped`, as are the samples of a batch the trainer refuses (it
names why: `stats.last_error`), and a sample larger than `max_pending_bytes` alone. Memory is
bounded by those samples (in slabs of whole batches) plus `max_in_flight` batches, each within
the trainer's limit on batches. `flush()` waits until every sample collected so far is
acknowledged or dropped; `close()` flushes, then stops. Samples still waiting when the process
ends without `close()` are lost; acknowledged ones are the trainer's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from shared.data.remote.pending import Pending
from shared.data.remote.samples import (
    CollectorStats,
    Layout,
    check_mapping,
    describe,
    layout_of,
    rows_layout,
    sample_bytes,
)
from shared.data.remote.sender import Sender
from shared.grpc.auth import TlsFiles

# The most bytes of samples waiting for the trainer, by default (a trainer away for a while).
MAX_PENDING_BYTES = 64 << 20


class RemoteDataCollector(Sender):
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

        Raises:
            ValueError: The buffer's name is not a non-empty str; a bound is not a whole
                number of at least 1; a duration is not a finite number of seconds, is
                negative, or (`timeout_s`) is 0; or an address is not HOST:PORT with a port
                from 1 to 65535.
            ConfigurationError: The token is not printable ASCII, a TLS file cannot be read
                or holds no PEM of its kind, or `server_name` is given without `tls`.
        """
        if not isinstance(buffer, str) or not buffer:
            raise ValueError(f"buffer must be a buffer's name (a non-empty str): got {buffer!r}")
        check_bounds(
            batch_size=batch_size,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
            max_in_flight=max_in_flight,
        )
        check_durations(
            max_delay_s=max_delay_s,
            timeout_s=timeout_s,
            retry_max_s=retry_max_s,
            idle_close_s=idle_close_s,
        )
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._pending_limit = max_pending  # in samples, both bounds (set by the first sample)
        self._full = ""
        super().__init__(
            address,
            buffer,
            token=token,
            tls=tls,
            server_name=server_name,
            batch_size=batch_size,
            max_delay_s=max_delay_s,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
            retry_max_s=retry_max_s,
            idle_close_s=idle_close_s,
        )

    # The agent's side.

    def collect(self, data: Mapping[str, Any]) -> None:
        """Queue one sample for the trainer's buffer; returns without waiting for the network.

        Args:
            data: The sample: each of the buffer's tensor names to a tensor, numpy array or
                number (copied here: the caller may reuse its memory at once).

        Raises:
            ValueError: The sample's names, dtypes or shapes differ from the first sample's.
                A value is not a tensor, numpy array or number (named).
            TypeError: `data` is not a mapping.
            RuntimeError: The collector is closed, or was opened in the process this one
                was forked from (its thread sends from there).
        """
        with self._lock:
            self._refuse_closed()
            pending = self._pending
            first = pending is None
            if pending is None:
                check_mapping(data)
                pending = self._pending = self._start(layout_of(data))
            try:
                if not self._pending_limit:
                    self._too_large(data, pending)
                    return
                full = pending.put(data)
            except ValueError as exc:
                raise ValueError(self._refused(first, pending, exc)) from None
            except (TypeError, AttributeError):
                if first:
                    self._pending = None
                check_mapping(data)  # checked here, off the hot path
                raise
            self._collected += 1
            if pending.count > self._pending_limit:
                pending.drop_oldest()
                self._drop(1, self._full)
            if full:  # a batch is full: wake the sender
                self._changed.notify_all()

    def collect_rows(self, data: Mapping[str, Any], *, wait_s: float = 0.0) -> None:
        """Queue the samples `data` holds, one per row (each tensor's first dimension indexes
        the samples). What `collect` does for each row in turn, in one call: the same checks
        (a row must be laid out as the first sample collected), the same bounds and the same
        drops, oldest first (rows that the bounds would drop before this call ends, the
        trainer taking none meanwhile, are counted and never copied), but one copy per tensor
        for each slab of rows, not one per sample, and the lock given up between slabs (the
        sending thread sends the full ones meanwhile).

        Args:
            data: Each of the buffer's tensor names to its rows (tensors, numpy arrays).
            wait_s: Where the bounds would drop samples, how long the call may wait for the
                trainer to acknowledge some (0: it never waits, as `collect`), again after each
                acknowledgement. It waits only while the trainer is not known to be away: once
                a call to it failed, and until it acknowledges a batch again, or once `wait_s`
                passed without an acknowledgement, the oldest go as above, for the rest of the
                call.

        Raises:
            ValueError: The rows' names, dtypes or shapes differ from the first sample's, or
                the tensors' row counts differ; nothing of `data` is collected then.
            RuntimeError: The collector is closed, or was opened in the process this one
                was forked from.
        """
        check_mapping(data)
        layout, count = rows_layout(data)
        with self._lock:
            self._refuse_closed()
            pending = self._pending
            first = pending is None
            if pending is None:
                if not count:
                    return
                pending = self._pending = self._start(layout)
            try:
                columns = pending.columns_of(data, count)
            except ValueError as exc:
                raise ValueError(self._refused(first, pending, exc)) from None
            limit = self._pending_limit
            if not limit:
                self._collected += count
                self._drop(count, self._too_large_why(pending))
                return
        done = 0
        while done < count:
            with self._lock:
                room = wait_s > 0 and self._wait_for_room(pending, count - done, wait_s)
                if not room:  # waited `wait_s` for nothing, or the trainer is away: no more
                    wait_s = 0.0
                if self._closing:  # close() gave up on what waits: so on the rest
                    self._collected += count - done
                    self._drop(count - done, "the collector closed while they were collected")
                    return
                if not room and count - done > limit:  # dropped by the newer rows
                    skip = count - done - limit
                    done += skip
                    self._collected += skip
                    self._drop(skip, self._full)
                put, full = pending.put_rows(columns, done, count - done)
                done += put
                self._collected += put
                over = pending.count - limit
                if over > 0:
                    pending.drop_oldest(over)
                    self._drop(over, self._full)
                if full:  # a batch is full: wake the sender
                    self._changed.notify_all()

    def _refused(self, first: bool, pending: Pending, error: ValueError) -> str:
        """Why a sample was refused; a first sample refused sets no layout for later ones."""
        if first:
            self._pending = None
            return f"sample refused: {error}"
        return f"sample differs from the first one collected, {describe(pending.layout)}: {error}"

    def _wait_for_room(self, pending: Pending, rows: int, wait_s: float) -> bool:
        """Wait (the lock held, released while waiting) until the queue has room for the next
        slab's worth of `rows`, while the trainer is not known to be away and acknowledged a
        batch within the last `wait_s`; whether it has room."""
        limit = self._pending_limit
        acknowledged = self._acknowledged_samples
        deadline = time.monotonic() + wait_s
        while True:
            need = min(rows, pending.room or pending.capacity)
            if pending.count + need <= limit:
                return True
            if self._acknowledged_samples != acknowledged:  # the trainer takes them: wait on
                acknowledged = self._acknowledged_samples
                deadline = time.monotonic() + wait_s
            left = deadline - time.monotonic()
            if left <= 0 or self._problem is not None or self._closing:
                return False
            self._changed.notify_all()  # the sender: a batch is due
            self._changed.wait(left)

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
        self._drop(1, self._too_large_why(pending))

    def _too_large_why(self, pending: Pending) -> str:
        return (
            f"a sample takes {sample_bytes(pending.layout)} bytes; the collector holds at most "
            f"max_pending_bytes {self._max_pending_bytes} of samples waiting"
        )

    @property
    def stats(self) -> CollectorStats:
        with self._lock:
            return self._stats()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every sample collected so far is acknowledged or dropped.

        Returns:
            Whether it came to that within `timeout` seconds (None: no limit).

        Raises:
            RuntimeError: The collector was opened in the process this one was forked from:
                nothing sends here.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._fork_of is not None:
                self._refuse_closed()
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
        the final stats. In a process forked from the one that opened it, it only returns
        them: the samples are that process's to send."""
        if self._fork_of is not None:
            return self.stats
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
        if not flushed:  # at once: cancels the call, and any wait on a trainer not answering
            self._route.close()
        self._thread.join(self._timeout_s)
        self._route.close()
        return self.stats

    def __enter__(self) -> RemoteDataCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_bounds(**bounds: object) -> None:
    """Refuse a bound that is not a whole number of at least 1 (a float or a bool would fail
    in every `collect()` instead).

    Raises:
        ValueError: Naming the first such bound.
    """
    for name, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number, at least 1: got {value!r}")


def check_durations(**durations: object) -> None:
    """Refuse a duration the sending thread could not wait with: each a finite number of
    seconds, none negative, `timeout_s` above 0 (a call given no time fails at once). None,
    infinity or NaN would stop the thread, or a join, where it compares or waits.

    Raises:
        ValueError: Naming the first duration that is not such.
    """
    for name, value in durations.items():
        positive = name == "timeout_s"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (positive and value == 0)
        ):
            least = "above 0" if positive else "0 or more"
            raise ValueError(f"{name} must be a finite number of seconds, {least}: got {value!r}")
