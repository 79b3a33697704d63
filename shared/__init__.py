"""Code both services share: the PAMIQ-Core model and data APIs, the App definition, the
weights codec.

The model API and the rest are imported on first use (`from shared import TorchTrainingModel`
works as usual), so that programs which need only the light parts, the sync relay among them,
start without loading torch; the data API (`shared.data`, torch-free) is imported as is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shared import data
from shared.data import *  # noqa: F403 (its __all__ is added to this one's)

if TYPE_CHECKING:
    from shared.app import App, TensorSpec
    from shared.data.remote import RemoteDataCollector
    from shared.model import InferenceModel, InferenceModelsDict, TrainingModel, TrainingModelsDict
    from shared.torch import (
        TorchInferenceModel,
        TorchTrainer,
        TorchTrainingModel,
        default_infer_procedure,
        get_device,
    )
    from shared.trainer import Trainer, TrainersDict

_HOMES = {
    "App": "shared.app",
    "TensorSpec": "shared.app",
    "RemoteDataCollector": "shared.data.remote",
    "InferenceModel": "shared.model",
    "InferenceModelsDict": "shared.model",
    "TrainingModel": "shared.model",
    "TrainingModelsDict": "shared.model",
    "TorchInferenceModel": "shared.torch",
    "TorchTrainer": "shared.torch",
    "TorchTrainingModel": "shared.torch",
    "default_infer_procedure": "shared.torch",
    "get_device": "shared.torch",
    "Trainer": "shared.trainer",
    "TrainersDict": "shared.trainer",
}

__all__ = [
    "App",
    "InferenceModel",
    "InferenceModelsDict",
    "RemoteDataCollector",
    "TensorSpec",
    "TorchInferenceModel",
    "TorchTrainer",
    "TorchTrainingModel",
    "Trainer",
    "TrainersDict",
    "TrainingModel",
    "TrainingModelsDict",
    "default_infer_procedure",
    "get_device",
]
__all__ += data.__all__  # the data API, torch-free, is imported as is


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'shared' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
