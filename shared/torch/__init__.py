"""PAMIQ-Core's torch models and trainer."""

from shared.torch.model import (
    InferenceProcedureCallable,
    TorchInferenceModel,
    TorchTrainingModel,
    UnwrappedContextManager,
    default_infer_procedure,
    get_device,
)
from shared.torch.trainer import (
    LRSchedulersDict,
    OptimizersDict,
    OptimizersSetup,
    StateDict,
    TorchTrainer,
)

__all__ = [
    "InferenceProcedureCallable",
    "LRSchedulersDict",
    "OptimizersDict",
    "OptimizersSetup",
    "StateDict",
    "TorchInferenceModel",
    "TorchTrainer",
    "TorchTrainingModel",
    "UnwrappedContextManager",
    "default_infer_procedure",
    "get_device",
]
