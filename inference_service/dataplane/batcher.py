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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

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


@dataclass
class _Request:
    inputs: list[Tensor]
    deadline: float | None
    version: int | None = None  # the version the request must run on (None: the live one)
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Result] = field(default_factory=Future)
    rows: int = field(init=False)
    key: ShapeKey = field(init=False)  # requests with equal keys can batch together

    def __post_init__(self) -> None:
        self.rows = int(self.inputs[0].shape[0])
        self.key = shape_key(self.inputs)


class Batcher:
    def __init__(
        self,
        model: ServedModel,
        config: BatchingConfig,
        normalize: Callable[[object, int], list[Tensor]],
        on_execution: Callable[[str, int, float, list[float]], None] | None = None,
    ) -> None:
        self._on_execution = on_execution
        self.model = model
        self.config = config
        self._normalize = normalize
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._gather = False  # wait for more before the next batch: the last one held several
        self._thread = threading.Thread(target=self._run, name=f"batcher-{model.name}", daemon=True)
        self._thread.start()

    def submit(
        self, inputs: list[Tensor], timeout_s: float | None, version: int | None = None
    ) -> Future[Result]:
        """Queue one request (every input with the same number of rows); `version`, if given,
        is the only one it may run on."""
        request = _Request(inputs, time.monotonic() + timeout_s if timeout_s else None, version)
        with self._cond:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                raise UnavailableError(
                    f"model {self.model.name!r}: the request queue is full "
                    f"({self.config.max_queue}); retry with backoff"
                )
            self._queue.append(request)
            self._cond.notify()
        return request.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take_batch(self) -> list[_Request]:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            if not self._queue:
                return []
            head = self._queue[0]
            limit = head.enqueued + self.config.max_queue_delay_s
            while (
                self._gather
                and self._rows_like(head) < self.config.max_batch_size
                and not self._closed
            ):
                left = limit - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            batch = self._pop_batch()
            self._gather = len(batch) > 1
            return batch

    def _pop_batch(self) -> list[_Request]:
        """The oldest live request and, in order, the queued ones that can join it; the others
        stay queued in their order. Called holding the condition."""
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
            if not request.future.set_running_or_notify_cancel():  # the caller gave up
                continue
            if request.deadline is not None and request.deadline <= now:
                request.future.set_exception(
                    DeadlineExceededError("the request's deadline passed while it queued")
                )
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
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            with self.model.acquire() as generation:
                self._execute([r for r in batch if self._runs_on(generation, r)], generation)

    def _runs_on(self, generation: Generation, request: _Request) -> bool:
        """Whether `request` may run on the pinned `generation`; if not, it fails, naming the
        version served."""
        if request.version is None or request.version == generation.version:
            return True
        request.future.set_exception(
            version_not_served(self.model.name, request.version, generation.version)
        )
        return False

    def _execute(self, batch: list[_Request], generation: Generation) -> None:
        if not batch:
            return
        started = time.monotonic()
        rows = sum(r.rows for r in batch)
        for request in batch:
            metrics.QUEUE_SECONDS.labels(self.model.name).observe(started - request.enqueued)
        metrics.BATCH_SIZE.labels(self.model.name).observe(rows)
        try:
            joined = [join_rows([r.inputs[i] for r in batch]) for i in range(len(batch[0].inputs))]
            result = self.model.run(generation, joined)
            outputs = self._normalize(result, len(self.model.spec.outputs))
            if len(batch) > 1:
                check_rows(self.model.name, outputs, rows)
            took = time.monotonic() - started
            metrics.COMPUTE_SECONDS.labels(self.model.name).observe(took)
            if self._on_execution is not None:
                self._on_execution(
                    self.model.name, rows, took, [started - r.enqueued for r in batch]
                )
        except Exception as error:
            logger.exception("model %s: a batch of %d failed", self.model.name, len(batch))
            for request in batch:
                request.future.set_exception(error)
            return
        for request, parts in zip(batch, split_rows(outputs, [r.rows for r in batch]), strict=True):
            request.future.set_result((parts, generation))
