"""PAMIQ-Core's model interface, plus the remote inference copy of the sync plane."""

from shared.model.container import InferenceModelsDict, TrainingModelsDict
from shared.model.interface import InferenceModel, TrainingModel
from shared.model.remote import RemoteInferenceModel

__all__ = [
    "InferenceModel",
    "InferenceModelsDict",
    "RemoteInferenceModel",
    "TrainingModel",
    "TrainingModelsDict",
]
