"""PAMIQ-Core's trainer: setup, train, sync the models it looked up, teardown; and train only
when its data says so (`training_condition_data_user`, `min_buffer_size`, `min_new_data_count`).

PAMIQ's training threads and pausable clock are out of scope here; the trainer service runs
trainers one `run()` at a time, and times come from `shared.data.clock`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import UserDict
from pathlib import Path
from typing import Any

from typing_extensions import override

from shared.data.clock import now
from shared.data.container import DataUsersDict
from shared.data.interface import DataUser
from shared.model.container import TrainingModelsDict
from shared.model.interface import TrainingModel
from shared.state import PersistentStateMixin

PREVIOUS_TRAINING_TIME = "previous_training_time"


class Trainer(ABC, PersistentStateMixin):
    """Trains some of the app's models; every model it looked up is synced after each run.

    Override `train` (required), and as needed `on_training_models_attached` (look the models
    up there), `on_data_users_attached` (look the data users up there), `is_trainable`,
    `setup` and `teardown`.
    """

    def __init__(
        self,
        training_condition_data_user: str | None = None,
        min_buffer_size: int = 0,
        min_new_data_count: int = 0,
    ) -> None:
        """Initialize the trainer.

        Args:
            training_condition_data_user: The data user whose data decides whether a run
                trains (see `is_trainable`); None: every run trains.
            min_buffer_size: The fewest samples its buffer must hold.
            min_new_data_count: The fewest samples that must have arrived since the last
                run that trained.
        """
        self._training_models: TrainingModelsDict | None = None
        self._retrieved_model_names: list[str] = []
        self._data_users: DataUsersDict | None = None
        self._training_condition_data_user = training_condition_data_user
        self._min_buffer_size = min_buffer_size
        self._min_new_data_count = min_new_data_count
        self._previous_training_time = float("-inf")

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

    def attach_data_users(self, data_users: DataUsersDict) -> None:
        """Give the trainer the data users it may read, then call `on_data_users_attached`.

        Args:
            data_users: The data users by name.
        """
        self._data_users = data_users
        self.on_data_users_attached()

    def on_data_users_attached(self) -> None:
        """Hook called once the data users are attached: look them up with `get_data_user`."""

    def get_data_user(self, name: str) -> DataUser[Any]:
        """The data user `name`.

        Args:
            name: The buffer's name.

        Returns:
            The data user.

        Raises:
            RuntimeError: No data users are attached yet.
            KeyError: No buffer is named `name`.
        """
        if self._data_users is None:
            raise RuntimeError(
                f"{type(self).__name__} has no data users attached yet; look them up in "
                "on_data_users_attached, which runs once attach_data_users is called"
            )
        if name not in self._data_users:
            known = ", ".join(sorted(self._data_users)) or "none"
            raise KeyError(f"no data user (buffer) named {name!r}; there are: {known}")
        return self._data_users[name]

    @property
    def training_condition_data_user(self) -> str | None:
        """The data user whose data decides whether a run trains (None: every run does)."""
        return self._training_condition_data_user

    def is_trainable(self) -> bool:
        """Whether `run()` should train now.

        Always, without a `training_condition_data_user`. Otherwise that data user is updated,
        and it is trainable when its buffer holds at least `min_buffer_size` samples and at
        least `min_new_data_count` arrived since the last time this returned True (since
        ever, the first time); returning True records the time.
        """
        if self._training_condition_data_user is None:
            return True
        data_user = self.get_data_user(self._training_condition_data_user)
        data_user.update()
        trainable = (
            len(data_user) >= self._min_buffer_size
            and data_user.count_data_added_since(self._previous_training_time)
            >= self._min_new_data_count
        )
        if trainable:
            self._previous_training_time = now()
        return trainable

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
        """Create the directory `path` and save the last training time into it, as text
        (`-inf` before the first); subclasses save their state there too.

        Args:
            path: The trainer's state directory.
        """
        path.mkdir(parents=True, exist_ok=True)
        (path / PREVIOUS_TRAINING_TIME).write_text(
            str(self._previous_training_time), encoding="utf-8"
        )

    @override
    def load_state(self, path: Path) -> None:
        """Load the last training time `save_state` saved (a state saved without one, before
        trainers had data, leaves it as it is).

        Args:
            path: The trainer's state directory.

        Raises:
            ValueError: The saved time is not a number.
        """
        saved = path / PREVIOUS_TRAINING_TIME
        if saved.is_file():
            text = saved.read_text("utf-8")
            try:
                self._previous_training_time = float(text)
            except ValueError:
                raise ValueError(f"{saved} holds {text[:40]!r}, not a time") from None


class TrainersDict(UserDict[str, Trainer], PersistentStateMixin):
    """Trainers by name."""

    def attach_training_models(self, training_models: TrainingModelsDict) -> None:
        """Attach `training_models` to every trainer.

        Args:
            training_models: The training models by name.
        """
        for trainer in self.data.values():
            trainer.attach_training_models(training_models)

    def attach_data_users(self, data_users: DataUsersDict) -> None:
        """Attach `data_users` to every trainer.

        Args:
            data_users: The data users by name.
        """
        for trainer in self.data.values():
            trainer.attach_data_users(data_users)

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
