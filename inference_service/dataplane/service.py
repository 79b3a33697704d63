"""The data plane's use-cases: readiness, metadata and inference, free of protobuf."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from inference_service import metrics
from inference_service.dataplane.batcher import Batcher, BatchingConfig
from inference_service.dataplane.stats import StatsBook
from inference_service.dataplane.tensors import Tensor, normalize_model_outputs
from inference_service.served_model import Generation, ServedModel
from shared.devices import use_torch_threads
from shared.errors import ModelNotFoundError, UnavailableError


class DataPlane:
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        batching: BatchingConfig | None = None,
        workers: int = 8,
    ) -> None:
        self._models = models
        # Models that are not batched run here, so a slow one never blocks the event loop.
        self._workers = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="model", initializer=use_torch_threads
        )
        self._ready = threading.Event()
        self._batchers: dict[str, Batcher] = {}
        self.stats = StatsBook()
        self.batching = batching if batching is not None and batching.max_batch_size > 1 else None
        if batching is not None and batching.max_batch_size > 1:
            for name, model in models.items():
                if batchable(model):
                    self._batchers[name] = Batcher(
                        model, batching, normalize_model_outputs, self.stats.execution
                    )

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self._workers.shutdown(wait=True)

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
        """The served model `name`; `version`, if given, must be the one being served."""
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"no model named {name!r} is served here (served: {known})")
        if version and version != str(model.live.version):
            raise ModelNotFoundError(
                f"model {name!r} version {version} is not served; version "
                f"{model.live.version} is (leave the version empty for the latest)"
            )
        return model

    def is_batched(self, name: str) -> bool:
        return name in self._batchers

    def model_ready(self, name: str, version: str = "") -> bool:
        self.model(name, version)
        return self.ready

    async def infer(
        self, model: ServedModel, inputs: list[Tensor], timeout_s: float | None = None
    ) -> tuple[list[Tensor], Generation]:
        """Run one request: through the model's batcher when it has one, else on a worker
        thread; the event loop only waits."""
        if not self.ready:
            raise UnavailableError("the server is not ready (starting or shutting down); retry")
        started = time.perf_counter()
        rows = int(inputs[0].shape[0]) if inputs and len(inputs[0].shape) else 1
        batcher = self._batchers.get(model.name)
        try:
            if batcher is not None:
                outputs, generation = await asyncio.wrap_future(batcher.submit(inputs, timeout_s))
            else:
                loop = asyncio.get_running_loop()
                outputs, generation = await loop.run_in_executor(
                    self._workers, self._run, model, inputs, rows
                )
        except Exception:
            self.stats.request(model.name, time.perf_counter() - started, rows, ok=False)
            raise
        self.stats.request(model.name, time.perf_counter() - started, rows, ok=True)
        metrics.REQUEST_SECONDS.labels(model.name).observe(time.perf_counter() - started)
        return outputs, generation

    def _run(
        self, model: ServedModel, inputs: list[Tensor], rows: int
    ) -> tuple[list[Tensor], Generation]:
        started = time.perf_counter()
        result, generation = model.infer(inputs)
        outputs = normalize_model_outputs(result, len(model.spec.outputs))
        took = time.perf_counter() - started
        metrics.COMPUTE_SECONDS.labels(model.name).observe(took)
        self.stats.execution(model.name, rows, took, [0.0])
        return outputs, generation


def batchable(model: ServedModel) -> bool:
    """Whether requests can be joined along a leading batch dimension (-1 on every tensor)."""
    tensors = (*model.spec.inputs, *model.spec.outputs)
    return all(t.shape and t.shape[0] == -1 for t in tensors)
