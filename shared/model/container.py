"""Models by name, as PAMIQ-Core keeps them: one dict per side, sharing the names."""

from __future__ import annotations

from collections import UserDict
from pathlib import Path
from typing import Any

from typing_extensions import override

from shared.model.interface import InferenceModel, TrainingModel
from shared.state import PersistentStateMixin


class InferenceModelsDict(UserDict[str, InferenceModel]):
    """Inference models by name: what the inference side looks its models up in."""


class TrainingModelsDict(UserDict[str, TrainingModel[Any]], PersistentStateMixin):
    """Training models by name; registering one publishes its inference copy under that name.

    `d[name] = model` stores `model` and, if it has an inference copy, puts
    `model.inference_model` (created here if it does not exist yet) into
    `inference_models_dict[name]`. Inference-thread-only models are stored but cannot be
    fetched: no trainer may train them.

    Args:
        *args: As for `dict`.
        **kwds: As for `dict`.
    """

    def __init__(self, *args: Any, **kwds: Any) -> None:
        self._inference_models_dict = InferenceModelsDict()
        super().__init__(*args, **kwds)

    @property
    def inference_models_dict(self) -> InferenceModelsDict:
        """The inference copies by name (the same object every time; do not modify it)."""
        return self._inference_models_dict

    @override
    def __setitem__(self, key: str, model: TrainingModel[Any]) -> None:
        super().__setitem__(key, model)
        if model.has_inference_model:
            self._inference_models_dict[key] = model.inference_model

    @override
    def __getitem__(self, key: str) -> TrainingModel[Any]:
        """The training model `key`.

        Raises:
            KeyError: No model is named `key`, or it is inference-thread-only.
        """
        model = super().__getitem__(key)
        if model.inference_thread_only:
            raise KeyError(f"model '{key}' is inference thread only.")
        return model

    @override
    def save_state(self, path: Path) -> None:
        """Create the directory `path` and save every model into `path/<name>`.

        Args:
            path: A directory to create; it must not exist yet.
        """
        path.mkdir()
        for name, model in self.data.items():
            model.save_state(path / name)

    @override
    def load_state(self, path: Path) -> None:
        """Load every model from `path/<name>`, then sync it.

        Args:
            path: The directory `save_state` wrote.
        """
        for name, model in self.data.items():
            model.load_state(path / name)
            model.sync()
