"""PAMIQ-Core's trainer shape: setup, train, sync the models used, teardown."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import UserDict
from pathlib import Path
from typing import Any

from shared.model.container import TrainingModelsDict
from shared.model.interface import TrainingModel
from shared.state import PersistentStateMixin


class Trainer(ABC, PersistentStateMixin):
    """Trains some of the app's models; every model it looks up is synced after each run."""

    def __init__(self) -> None:
        self._training_models: TrainingModelsDict | None = None
        self._retrieved_model_names: list[str] = []

    def attach_training_models(self, training_models: TrainingModelsDict) -> None:
        self._training_models = training_models
        self.on_training_models_attached()

    def on_training_models_attached(self) -> None:
        """Hook: look up models here with `get_training_model`."""

    def get_training_model(self, name: str) -> TrainingModel[Any]:
        """The training model `name`; it will be synced after every run of this trainer."""
        if self._training_models is None:
            raise RuntimeError("no training models attached yet; call attach_training_models")
        model = self._training_models[name]
        if name not in self._retrieved_model_names:
            self._retrieved_model_names.append(name)
        return model

    @property
    def retrieved_model_names(self) -> list[str]:
        """The models this trainer looked up, in order: the ones it syncs."""
        return list(self._retrieved_model_names)

    def is_trainable(self) -> bool:
        """Whether to run now (always, unless overridden)."""
        return True

    def setup(self) -> None:
        """Before each training run."""

    @abstractmethod
    def train(self) -> None:
        """One training run."""

    def sync_models(self) -> None:
        """Sync every model this trainer looked up (once each)."""
        assert self._training_models is not None
        for name in self._retrieved_model_names:
            self._training_models[name].sync()

    def teardown(self) -> None:
        """After each training run."""

    def run(self) -> bool:
        """setup, train, sync_models, teardown; False (and nothing run) when not trainable."""
        if not self.is_trainable():
            return False
        self.setup()
        self.train()
        self.sync_models()
        self.teardown()
        return True


class TrainersDict(UserDict[str, Trainer], PersistentStateMixin):
    """Trainers by name."""

    def attach_training_models(self, training_models: TrainingModelsDict) -> None:
        for trainer in self.values():
            trainer.attach_training_models(training_models)

    def save_state(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name, trainer in self.items():
            trainer.save_state(path / name)

    def load_state(self, path: Path) -> None:
        for name, trainer in self.items():
            trainer.load_state(path / name)
