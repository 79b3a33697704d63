"""PAMIQ-Core's trainer: setup, train, sync the models it looked up, teardown.

PAMIQ's data buffers, training threads and pausable clock are out of scope here; the trainer
service runs trainers one `run()` at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import UserDict
from pathlib import Path
from typing import Any

from typing_extensions import override

from shared.model.container import TrainingModelsDict
from shared.model.interface import TrainingModel
from shared.state import PersistentStateMixin


class Trainer(ABC, PersistentStateMixin):
    """Trains some of the app's models; every model it looked up is synced after each run.

    Override `train` (required), and as needed `on_training_models_attached` (look the models
    up there), `is_trainable`, `setup` and `teardown`.
    """

    def __init__(self) -> None:
        self._training_models: TrainingModelsDict | None = None
        self._retrieved_model_names: list[str] = []

    def attach_training_models(self, training_models: TrainingModelsDict) -> None:
        """Give the trainer the models it may train, then call `on_training_models_attached`.

        Args:
            training_models: The training models by name.
        """
        self._training_models = training_models
        self.on_training_models_attached()

    def on_training_models_attached(self) -> None:
        """Hook called once the models are attached: look them up with `get_training_model`."""

    def get_training_model(self, name: str) -> TrainingModel[Any]:
        """The training model `name`; from now on it is synced after every run of this trainer.

        Args:
            name: The model's name.

        Returns:
            The training model.

        Raises:
            RuntimeError: No models are attached yet.
            KeyError: No model is named `name`, or it is inference-thread-only.
        """
        if self._training_models is None:
            raise RuntimeError(
                f"{type(self).__name__} has no training models attached yet; look models up in "
                "on_training_models_attached, which runs once attach_training_models is called"
            )
        model = self._training_models[name]
        if name not in self._retrieved_model_names:
            self._retrieved_model_names.append(name)
        return model

    @property
    def retrieved_model_names(self) -> list[str]:
        """The names of the models this trainer looked up, in order: the ones it syncs."""
        return list(self._retrieved_model_names)

    def is_trainable(self) -> bool:
        """Whether `run()` should train now (always, unless overridden)."""
        return True

    def setup(self) -> None:
        """Hook called before each training run."""

    @abstractmethod
    def train(self) -> None:
        """One training run; `sync_models()` follows it."""

    def sync_models(self) -> None:
        """Sync every model this trainer looked up, once each."""
        if self._training_models is None:
            return  # nothing attached: nothing looked up
        for name in self._retrieved_model_names:
            self._training_models[name].sync()

    def teardown(self) -> None:
        """Hook called after each training run (after the sync, whether or not it succeeded)."""

    def run(self) -> bool:
        """Run `setup`, `train`, `sync_models` and `teardown`, if the trainer is trainable.

        `teardown` runs even when the sync fails (an inference service is unreachable), so
        what it keeps of the run (TorchTrainer: the optimizer states) is never lost; the
        sync's error is raised after it.

        Returns:
            Whether it trained: False (and nothing run) when `is_trainable()` is False.
        """
        if not self.is_trainable():
            return False
        self.setup()
        self.train()
        try:
            self.sync_models()
        finally:
            self.teardown()
        return True

    @override
    def save_state(self, path: Path) -> None:
        """Create the directory `path` (subclasses save their state into it).

        Args:
            path: The trainer's state directory.
        """
        path.mkdir(parents=True, exist_ok=True)


class TrainersDict(UserDict[str, Trainer], PersistentStateMixin):
    """Trainers by name."""

    def attach_training_models(self, training_models: TrainingModelsDict) -> None:
        """Attach `training_models` to every trainer.

        Args:
            training_models: The training models by name.
        """
        for trainer in self.data.values():
            trainer.attach_training_models(training_models)

    @override
    def save_state(self, path: Path) -> None:
        """Create the directory `path` and save every trainer into `path/<name>`.

        Unlike PAMIQ, `path` may already exist: the trainer service saves into the same
        directory again and again.

        Args:
            path: The trainers' state directory.
        """
        path.mkdir(parents=True, exist_ok=True)
        for name, trainer in self.data.items():
            trainer.save_state(path / name)

    @override
    def load_state(self, path: Path) -> None:
        """Load every trainer from `path/<name>`.

        Args:
            path: The directory `save_state` wrote.
        """
        for name, trainer in self.data.items():
            trainer.load_state(path / name)
