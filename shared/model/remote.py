"""An inference copy that lives in other processes, reached through the sync plane."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from shared.model.interface import InferenceModel


class RemoteInferenceModel(InferenceModel, ABC):
    """Stands for inference copies held by remote inference services.

    `TorchTrainingModel.sync()` hands it the training weights; `publish` streams them to every
    inference service that holds the copy and returns once all have committed.
    """

    @abstractmethod
    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Stream `weights` to the remote copies; return when every one has committed."""

    def infer(self, *args: Any, **kwds: Any) -> Any:
        raise RuntimeError(
            "the inference copy of this model lives in remote inference services; query them "
            "over the Open Inference Protocol"
        )
