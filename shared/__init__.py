"""Code both services share: the PAMIQ-Core model API, the App definition, the weights codec."""

from shared.app import App, TensorSpec
from shared.model import InferenceModel, InferenceModelsDict, TrainingModel, TrainingModelsDict
from shared.torch import (
    TorchInferenceModel,
    TorchTrainer,
    TorchTrainingModel,
    default_infer_procedure,
    get_device,
)
from shared.trainer import Trainer, TrainersDict

__all__ = [
    "App",
    "InferenceModel",
    "InferenceModelsDict",
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
