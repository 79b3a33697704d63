"""The data plane's use-cases: readiness, metadata and inference, free of protobuf."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import torch

from inference_service import metrics
from inference_service.dataplane.tensors import normalize_model_outputs
from inference_service.served_model import Generation, ServedModel
from shared.errors import ModelNotFoundError, UnavailableError


class DataPlane:
    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self._models = models
        self._ready = threading.Event()

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

    def model_ready(self, name: str, version: str = "") -> bool:
        self.model(name, version)
        return self.ready

    def infer(
        self, model: ServedModel, inputs: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], Generation]:
        if not self.ready:
            raise UnavailableError("the server is not ready (starting or shutting down); retry")
        started = time.perf_counter()
        result, generation = model.infer(inputs)
        outputs = normalize_model_outputs(result, len(model.spec.outputs))
        metrics.REQUEST_SECONDS.labels(model.name).observe(time.perf_counter() - started)
        metrics.REQUESTS.labels(model.name).inc()
        return outputs, generation
