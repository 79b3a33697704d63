"""Code both services share: the PAMIQ-Core model and data APIs, the App definition, the
weights codec.

The model and data APIs are imported on first use (`from shared import TorchTrainingModel` works as
usual), so that programs which need only the light parts, the sync relay among them, start
without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.app import App, TensorSpec
    from shared.data import (
        DataBuffer,
        DataCollector,
        DataCollectorsDict,
        DataUser,
        DataUsersDict,
        DictRandomReplacementBuffer,
        DictSequentialBuffer,
        RandomReplacementBuffer,
        SequentialBuffer,
    )
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
    "DataBuffer": "shared.data",
    "DataCollector": "shared.data",
    "DataCollectorsDict": "shared.data",
    "DataUser": "shared.data",
    "DataUsersDict": "shared.data",
    "DictRandomReplacementBuffer": "shared.data",
    "DictSequentialBuffer": "shared.data",
    "RandomReplacementBuffer": "shared.data",
    "SequentialBuffer": "shared.data",
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
    "DataBuffer",
    "DataCollector",
    "DataCollectorsDict",
    "DataUser",
    "DataUsersDict",
    "DictRandomReplacementBuffer",
    "DictSequentialBuffer",
    "InferenceModel",
    "InferenceModelsDict",
    "RandomReplacementBuffer",
    "RemoteDataCollector",
    "SequentialBuffer",
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'shared' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
