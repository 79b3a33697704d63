"""Dynamic batching: requests for one model are queued, joined along their first dimension,
run once on one weights version, and split back.

A worker thread per model takes the oldest request, stops at `max_batch_size` rows, and drops
requests whose deadline passed before they were batched. It waits at most `max_queue_delay_s`
for more only while requests arrive together: after a batch that held one request it runs the
next at once, since a client alone would only wait out the delay on every request. The queue
is bounded: a full queue answers UNAVAILABLE at once. A batch runs wholly on the generation it
pinned, so every response in it names the same version.
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
from inference_service.dataplane.tensors import Tensor, join_rows
from inference_service.served_model import Generation, ServedModel
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
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Result] = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])


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

    def submit(self, inputs: list[Tensor], timeout_s: float | None) -> Future[Result]:
        request = _Request(inputs, time.monotonic() + timeout_s if timeout_s else None)
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
            limit = self._queue[0].enqueued + self.config.max_queue_delay_s
            while self._gather and self._rows() < self.config.max_batch_size and not self._closed:
                left = limit - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            batch: list[_Request] = []
            rows = 0
            now = time.monotonic()
            while self._queue:
                request = self._queue[0]
                if batch and rows + request.rows > self.config.max_batch_size:
                    break
                self._queue.popleft()
                if not request.future.set_running_or_notify_cancel():  # the caller gave up
                    continue
                if request.deadline is not None and request.deadline <= now:
                    request.future.set_exception(
                        DeadlineExceededError("the request's deadline passed while it queued")
                    )
                    continue
                batch.append(request)
                rows += request.rows
            self._gather = len(batch) > 1
            return batch

    def _rows(self) -> int:
        return sum(r.rows for r in self._queue)

    def _run(self) -> None:
        use_torch_threads()
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            started = time.monotonic()
            for request in batch:
                metrics.QUEUE_SECONDS.labels(self.model.name).observe(started - request.enqueued)
            metrics.BATCH_SIZE.labels(self.model.name).observe(sum(r.rows for r in batch))
            try:
                joined = [
                    join_rows([r.inputs[i] for r in batch]) for i in range(len(batch[0].inputs))
                ]
                result, generation = self.model.infer(joined)
                outputs = self._normalize(result, len(self.model.spec.outputs))
                took = time.monotonic() - started
                metrics.COMPUTE_SECONDS.labels(self.model.name).observe(took)
                if self._on_execution is not None:
                    self._on_execution(
                        self.model.name,
                        sum(r.rows for r in batch),
                        took,
                        [started - r.enqueued for r in batch],
                    )
            except Exception as error:
                logger.exception("model %s: a batch of %d failed", self.model.name, len(batch))
                for request in batch:
                    request.future.set_exception(error)
                continue
            offset = 0
            for request in batch:
                parts = [o[offset : offset + request.rows] for o in outputs]
                offset += request.rows
                request.future.set_result((parts, generation))
