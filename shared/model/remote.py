"""An inference copy that lives in other processes, reached through the sync plane."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from typing_extensions import override

from shared.model.interface import InferenceModel


class RemoteInferenceModel(InferenceModel, ABC):
    """Stands, on the trainer, for the inference copies that remote inference services hold.

    Attach one with `TrainingModel.attach_inference_model`; `TorchTrainingModel.sync()` then
    calls `publish` with the training weights instead of swapping modules.
    """

    @abstractmethod
    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Stream these weights to every inference service holding the copy.

        Returns once every one that could be reached has committed the new weights; the
        others lag and are caught up later (an implementation may defer or hold a failure:
        see trainer_service/remote.py).

        Args:
            weights: The training module's state dict (live tensors: read, never modify).
        """

    @override
    def infer(self, *args: Any, **kwds: Any) -> Any:
        """Refuse: there is nothing to run here.

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError(
            "cannot infer on the trainer: the inference copy of this model lives in remote "
            "inference services; query them over the Open Inference Protocol"
        )
