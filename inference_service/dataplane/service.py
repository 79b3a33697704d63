"""The data plane's use-cases: readiness, metadata and inference, free of protobuf."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from time import perf_counter

from prometheus_client import Histogram

from inference_service import metrics
from inference_service.dataplane.admission import Admission, RequestLimits, Ticket
from inference_service.dataplane.batch_rows import common_rows
from inference_service.dataplane.batcher import Batcher, BatchingConfig
from inference_service.dataplane.model_io import Tensor, normalize_model_outputs, tensor_bytes
from inference_service.dataplane.model_threads import ModelThreads
from inference_service.dataplane.stats import StatsBook
from inference_service.recording import Recorder
from inference_service.served_model import Generation, ServedModel, version_not_served
from shared.devices import use_torch_threads
from shared.errors import DeadlineExceededError, ModelNotFoundError, UnavailableError

WORKERS = 8  # threads running models that are not batched (--workers)
# How long a stopping service waits for model calls still running once its calls have drained
# (or were cancelled at the end of --grace): their answers can no longer reach anyone.
CALLS_WAIT_S = 2.0

logger = logging.getLogger(__name__)


class DataPlane:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        batching: BatchingConfig | None = None,
        workers: int = WORKERS,
        limits: RequestLimits | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._models = models
        self.recorder = recorder or Recorder.off()  # records served requests (recording.py)
        self.admission = Admission(limits or RequestLimits())
        # Models that are not batched run here, so a slow one never blocks the event loop.
        self._workers = ModelThreads(workers, "model", initializer=use_torch_threads)
        self._ready = threading.Event()
        self._batchers: dict[str, Batcher] = {}
        self.stats = StatsBook()
        self._seconds: dict[str, Histogram] = {}
        self._batchable = {name: batchable(model) for name, model in models.items()}
        self.batching = batching if batching is not None and batching.max_batch_size > 1 else None
        if batching is not None and batching.max_batch_size > 1:
            for name, model in models.items():
                if batchable(model):
                    self._batchers[name] = Batcher(
                        model, batching, normalize_model_outputs, self.stats.execution
                    )

    def close(self, timeout_s: float = CALLS_WAIT_S) -> None:
        """Stop running models: calls not started are dropped, those running waited for up to
        `timeout_s` seconds, then left to their (daemon) threads, which do not hold the
        process."""
        for batcher in self._batchers.values():
            batcher.stop()
        self._workers.stop()
        deadline = time.monotonic() + timeout_s
        running = sum(
            b.close(max(0.0, deadline - time.monotonic())) for b in self._batchers.values()
        )
        running += self._workers.close(max(0.0, deadline - time.monotonic()))
        if running:
            logger.warning(
                "%d model call(s) still running %gs after the drain; stopping without them",
                running,
                timeout_s,
            )

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self._models

    def set_ready(self, ready: bool) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def model(self, name: str, version: str = "") -> ServedModel:
        """The served model `name`; `version`, if given, must be the one being served now
        (a request that names one is held to it again where it runs: `infer`)."""
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"no model named {name!r} is served here (served: {known})")
        if version and version != str(model.live.version):
            raise version_not_served(name, version, model.live.version)
        return model

    def is_batched(self, name: str) -> bool:
        return name in self._batchers

    def model_ready(self, name: str, version: str = "") -> bool:
        self.model(name, version)
        return self.ready

    async def infer(
        self,
        model: ServedModel,
        inputs: list[Tensor],
        timeout_s: float | None = None,
        version: str = "",
        held: list[Ticket] | None = None,
    ) -> tuple[list[Tensor], Generation]:
        """Run one request: through the model's batcher when it has one, else on a worker
        thread; the event loop only waits. With `version`, it runs on that version or fails
        (VersionNotServedError): the check is made where the weights are pinned.

        The request holds a place in `admission` from here until its model has run (or it
        was dropped unrun), whether or not its caller still waits; with `held`, the place is
        appended there, and kept until the caller releases it as well (a stream's answer
        waiting for its client)."""
        if not self._ready.is_set():
            raise UnavailableError("the server is not ready (starting or shutting down); retry")
        pinned = self._version(model, version) if version else None
        name = model.name
        batcher = self._batchers.get(name)
        joins = self._batchable.get(name)
        if joins if joins is not None else batchable(model):
            rows = common_rows(model.spec.inputs, inputs)
        else:
            rows = int(inputs[0].shape[0]) if inputs and len(inputs[0].shape) else 1
        nbytes = tensor_bytes(inputs[0]) if len(inputs) == 1 else sum(map(tensor_bytes, inputs))
        ticket = self.admission.admit(name, nbytes, holders=1 if held is None else 2)
        if held is not None:
            held.append(ticket)
        started = perf_counter()
        try:
            if batcher is not None:
                # one hop to the batcher's thread and one back per batch (batcher.py)
                waiter = batcher.submit_async(inputs, timeout_s, pinned, ticket.release)
            else:
                expires = None if timeout_s is None else time.monotonic() + timeout_s
                future = self._workers.submit(self._run, model, inputs, rows, pinned, expires)
                future.add_done_callback(lambda _: ticket.release())
                waiter = asyncio.wrap_future(future)
        except BaseException:
            ticket.release()  # this side's hold; a caller's in `held` is the caller's to release
            raise
        try:
            outputs, generation = await waiter
        except Exception:
            self.stats.request(name, perf_counter() - started, rows, ok=False)
            raise
        took = perf_counter() - started
        self.stats.request(name, took, rows, ok=True)
        seconds = self._seconds.get(name)
        if seconds is None:
            seconds = self._request_seconds(name)
        seconds.observe(took)
        return outputs, generation

    def _request_seconds(self, model: str) -> Histogram:
        """The model's child of REQUEST_SECONDS, looked up once (labels() takes a lock and
        builds a key on every call)."""
        child = self._seconds.get(model)
        if child is None:
            child = self._seconds.setdefault(model, metrics.REQUEST_SECONDS.labels(model))
        return child

    @staticmethod
    def _version(model: ServedModel, version: str) -> int | None:
        """The version a request names (None: whichever is live when it runs)."""
        if not version:
            return None
        if not (version.isascii() and version.isdigit()):
            raise version_not_served(model.name, repr(version), model.live.version)
        return int(version)

    def _run(
        self,
        model: ServedModel,
        inputs: list[Tensor],
        rows: int,
        version: int | None,
        expires: float | None,
    ) -> tuple[list[Tensor], Generation]:
        if expires is not None and time.monotonic() >= expires:
            # As the batchers drop one (batcher.py): its caller is gone, or going, unanswered.
            raise DeadlineExceededError("the request's deadline passed while it queued")
        started = time.perf_counter()
        result, generation = model.infer(inputs, version)
        outputs = normalize_model_outputs(result, len(model.spec.outputs))
        took = time.perf_counter() - started
        metrics.COMPUTE_SECONDS.labels(model.name).observe(took)
        self.stats.execution(model.name, rows, took, [0.0])
        return outputs, generation


def batchable(model: ServedModel) -> bool:
    """Whether requests can be joined along a leading batch dimension (-1 on every tensor)."""
    tensors = (*model.spec.inputs, *model.spec.outputs)
    return bool(model.spec.inputs) and all(t.shape and t.shape[0] == -1 for t in tensors)
