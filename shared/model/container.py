"""Named collections of models, as PAMIQ-Core has them."""

from __future__ import annotations

from collections import UserDict
from pathlib import Path
from typing import Any

from shared.model.interface import InferenceModel, TrainingModel
from shared.state import PersistentStateMixin


class InferenceModelsDict(UserDict[str, InferenceModel]):
    """Inference models by name."""


class TrainingModelsDict(UserDict[str, TrainingModel[Any]], PersistentStateMixin):
    """Training models by name; registering one publishes its inference copy under that name."""

    def __init__(self, *args: Any, **kwds: Any) -> None:
        self._inference_models_dict = InferenceModelsDict()
        super().__init__(*args, **kwds)

    @property
    def inference_models_dict(self) -> InferenceModelsDict:
        return self._inference_models_dict

    def __setitem__(self, key: str, model: TrainingModel[Any]) -> None:
        super().__setitem__(key, model)
        if model.has_inference_model:
            self._inference_models_dict[key] = model.inference_model

    def __getitem__(self, key: str) -> TrainingModel[Any]:
        model = super().__getitem__(key)
        if model.inference_thread_only:
            raise KeyError(f"model '{key}' is inference thread only.")
        return model

    def save_state(self, path: Path) -> None:
        path.mkdir()
        for name, model in self.data.items():
            model.save_state(path / name)

    def load_state(self, path: Path) -> None:
        for name, model in self.data.items():
            model.load_state(path / name)
            model.sync()
