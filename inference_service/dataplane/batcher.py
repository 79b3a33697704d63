"""Dynamic batching: requests for one model are queued, joined along their first dimension,
run once on one weights version, and split back.

A worker thread per model takes the oldest request and the queued requests that can join it:
those whose inputs have the same sizes beyond the first dimension (the others wait, in order,
for a batch of their own), up to `max_batch_size` rows. It drops requests whose deadline passed
before they were batched. It waits at most `max_queue_delay_s` for more only while requests
arrive together: after a batch that held one request it runs the next at once, since a client
alone would only wait out the delay on every request. The queue is bounded: a full queue
answers UNAVAILABLE at once. A batch runs wholly on the generation it pinned, so every response
in it names the same version; a request that names a version runs in a batch only if the
pinned generation is that version, and fails otherwise (the check and the pin are one step).

Requests from the event loop (`submit_async`) cross threads once each way per batch, not per
request: the loop appends to the queue and wakes the worker only when it sleeps (or a gathering
batch is full), and the worker hands every answer of a batch back to the loop in one
`call_soon_threadsafe`. Each request's `on_settled` runs on the worker's thread once its model
has run or it was dropped unrun, whether or not its caller still waits. `submit` serves callers
on other threads with a `concurrent.futures.Future`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from inference_service import metrics
from inference_service.dataplane.batch_rows import (
    ShapeKey,
    check_rows,
    join_rows,
    shape_key,
    split_rows,
)
from inference_service.dataplane.model_io import Tensor
from inference_service.served_model import Generation, ServedModel, version_not_served
from shared.devices import use_torch_threads
from shared.errors import DeadlineExceededError, UnavailableError

logger = logging.getLogger(__name__)

Result = tuple[list[Tensor], Generation]


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    # Short: a closed-loop client waits for its answer, so a long delay only adds latency when
    # few clients are in flight (bench/serve.py, 8 clients: 0.5 ms served 2,550 requests/s,
    # 2 ms 1,950 and 5 ms 1,050); requests that arrive together still run together. Not
    # waiting at all served 8 clients less well (bench/curve.py: 2,600-3,000 requests/s
    # against 3,150-3,300), so the batcher waits, but only while batches hold more than one
    # request (one client: 1,580 requests/s, against 880 when it waited every time).
    max_queue_delay_s: float = 0.0005
    max_queue: int = 1024


# What a request's waiter is handed: its result, or the error it failed with (None for
# both: dropped unrun because its caller gave up).
Outcome = tuple["_Request", Result | None, BaseException | None]


class _Request:
    """One queued request and where its answer goes: a thread's `Future`, or (`loop` set) an
    asyncio future settled on that loop."""

    __slots__ = (
        "deadline",
        "enqueued",
        "future",
        "inputs",
        "key",
        "loop",
        "on_settled",
        "rows",
        "version",
    )

    def __init__(
        self,
        inputs: list[Tensor],
        deadline: float | None,
        version: int | None,  # the version the request must run on (None: the live one)
        future: Future[Result] | asyncio.Future[Result],
        loop: asyncio.AbstractEventLoop | None = None,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        self.inputs = inputs
        self.deadline = deadline
        self.version = version
        self.enqueued = time.monotonic()
        self.rows = int(inputs[0].shape[0])
        self.key: ShapeKey = shape_key(inputs)  # requests with equal keys can batch together
        self.future = future
        self.loop = loop
        self.on_settled = on_settled

    def claim(self) -> bool:
        """Whether the request is still wanted, marking a thread's future running if so."""
        if self.loop is None:
            assert isinstance(self.future, Future)
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()  # read off the loop: at worst, runs one unwanted


def _settle_on_loop(outcomes: list[Outcome]) -> None:
    """Answer a batch's loop requests; on their loop's thread."""
    for request, result, error in outcomes:
        future = request.future
        if not future.done():
            if error is not None:
                future.set_exception(error)
            elif result is not None:
                future.set_result(result)


class Batcher:
    def __init__(
        self,
        model: ServedModel,
        config: BatchingConfig,
        normalize: Callable[[object, int], list[Tensor]],
        on_execution: Callable[[str, int, float, list[float]], None] | None = None,
    ) -> None:
        self._on_execution = on_execution
        name = model.name
        self._queue_seconds = metrics.QUEUE_SECONDS.labels(name)
        self._batch_size = metrics.BATCH_SIZE.labels(name)
        self._compute_seconds = metrics.COMPUTE_SECONDS.labels(name)
        self.model = model
        self.config = config
        self._normalize = normalize
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._gather = False  # wait for more before the next batch: the last one held several
        self._idle = False  # the worker waits for any request: a new one wakes it
        self._gathering = False  # the worker waits for company: a full batch wakes it
        self._queued_rows = 0
        self._thread = threading.Thread(target=self._run, name=f"batcher-{model.name}", daemon=True)
        self._thread.start()

    def submit(
        self, inputs: list[Tensor], timeout_s: float | None, version: int | None = None
    ) -> Future[Result]:
        """Queue one request (every input with the same number of rows); `version`, if given,
        is the only one it may run on. For callers on any thread."""
        future: Future[Result] = Future()
        self._enqueue(_Request(inputs, _deadline(timeout_s), version, future))
        return future

    def submit_async(
        self,
        inputs: list[Tensor],
        timeout_s: float | None,
        version: int | None = None,
        on_settled: Callable[[], None] | None = None,
    ) -> asyncio.Future[Result]:
        """`submit` for a caller on a running event loop: its future is settled on that loop.
        `on_settled` is called on the worker's thread once the request has run or was dropped
        unrun, whether or not the caller still waits (not if this raises)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._enqueue(_Request(inputs, _deadline(timeout_s), version, future, loop, on_settled))
        return future

    def _enqueue(self, request: _Request) -> None:
        with self._cond:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                raise UnavailableError(
                    f"model {self.model.name!r}: the request queue is full "
                    f"({self.config.max_queue}); retry with backoff"
                )
            self._queue.append(request)
            self._queued_rows += request.rows
            # Wake the worker only if it waits for this: while it runs a batch it takes the
            # queue when it comes back, with no wake-up (a futex call and a thread switch).
            if self._idle or (self._gathering and self._queued_rows >= self.config.max_batch_size):
                self._cond.notify()

    def close(self, timeout_s: float | None = None) -> bool:
        """Take no more requests, run those queued, and wait up to `timeout_s` seconds (None:
        for good) for the worker to end; whether it still runs (a model call that has not
        returned: the worker is a daemon thread, which does not hold the process)."""
        self.stop()
        self._thread.join(timeout_s)
        return self._thread.is_alive()

    def stop(self) -> None:
        """Take no more requests; the worker ends once it has run those queued."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _take_batch(self, dropped: list[Outcome]) -> list[_Request]:
        with self._cond:
            self._idle = True
            try:
                self._cond.wait_for(lambda: self._queue or self._closed)
            finally:
                self._idle = False
            if not self._queue:
                return []
            head = self._queue[0]
            limit = head.enqueued + self.config.max_queue_delay_s
            self._gathering = True
            try:
                while (
                    self._gather
                    and self._rows_like(head) < self.config.max_batch_size
                    and not self._closed
                ):
                    left = limit - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        break
            finally:
                self._gathering = False
            batch = self._pop_batch(dropped)
            self._gather = len(batch) > 1
            return batch

    def _pop_batch(self, dropped: list[Outcome]) -> list[_Request]:
        """The oldest live request and, in order, the queued ones that can join it; the others
        stay queued in their order; those whose caller left or whose deadline passed go to
        `dropped`. Called holding the condition."""
        batch: list[_Request] = []
        passed: list[_Request] = []  # other shapes than the batch's
        rows = 0
        now = time.monotonic()
        while self._queue:
            request = self._queue.popleft()
            if batch and request.key != batch[0].key:
                passed.append(request)
                continue
            if batch and rows + request.rows > self.config.max_batch_size:
                self._queue.appendleft(request)
                break
            self._queued_rows -= request.rows
            if not request.claim():  # the caller gave up
                dropped.append((request, None, None))
                continue
            if request.deadline is not None and request.deadline <= now:
                error = DeadlineExceededError("the request's deadline passed while it queued")
                dropped.append((request, None, error))
                continue
            batch.append(request)
            rows += request.rows
        self._queue.extendleft(reversed(passed))
        return batch

    def _rows_like(self, head: _Request) -> int:
        """Rows queued that could join `head`'s batch."""
        return sum(r.rows for r in self._queue if r.key == head.key)

    def _run(self) -> None:
        use_torch_threads()
        while True:
            outcomes: list[Outcome] = []
            batch = self._take_batch(outcomes)
            if batch:
                with self.model.acquire() as generation:
                    runs = [r for r in batch if self._runs_on(generation, r, outcomes)]
                    self._execute(runs, generation, outcomes)
            _deliver(outcomes)
            if not batch and self._closed:
                with self._cond:
                    if not self._queue:
                        return

    def _runs_on(self, generation: Generation, request: _Request, outcomes: list[Outcome]) -> bool:
        """Whether `request` may run on the pinned `generation`; if not, it fails, naming the
        version served."""
        if request.version is None or request.version == generation.version:
            return True
        error = version_not_served(self.model.name, request.version, generation.version)
        outcomes.append((request, None, error))
        return False

    def _execute(
        self, batch: list[_Request], generation: Generation, outcomes: list[Outcome]
    ) -> None:
        if not batch:
            return
        started = time.monotonic()
        rows = sum(r.rows for r in batch)
        for request in batch:
            self._queue_seconds.observe(started - request.enqueued)
        self._batch_size.observe(rows)
        try:
            joined = [join_rows([r.inputs[i] for r in batch]) for i in range(len(batch[0].inputs))]
            result = self.model.run(generation, joined)
            outputs = self._normalize(result, len(self.model.spec.outputs))
            if len(batch) > 1:
                check_rows(self.model.name, outputs, rows)
            took = time.monotonic() - started
            self._compute_seconds.observe(took)
            if self._on_execution is not None:
                self._on_execution(
                    self.model.name, rows, took, [started - r.enqueued for r in batch]
                )
        except Exception as error:
            logger.exception("model %s: a batch of %d failed", self.model.name, len(batch))
            outcomes.extend((request, None, error) for request in batch)
            return
        for request, parts in zip(batch, split_rows(outputs, [r.rows for r in batch]), strict=True):
            outcomes.append((request, (parts, generation), None))


def _deadline(timeout_s: float | None) -> float | None:
    """When a request with `timeout_s` left expires (None: never; 0 or less: it has)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def _deliver(outcomes: list[Outcome]) -> None:
    """Hand each request its outcome: a thread's future at once, a loop's requests in one
    callback per loop."""
    loops: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        request, result, error = outcome
        if request.on_settled is not None:
            request.on_settled()
        if request.loop is not None:
            loops.setdefault(request.loop, []).append(outcome)
            continue
        assert isinstance(request.future, Future)
        if error is not None:
            request.future.set_exception(error)
        elif result is not None:
            request.future.set_result(result)
    for loop, answers in loops.items():
        # RuntimeError: the loop is closed, and no one waits for these answers any more
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_on_loop, answers)
