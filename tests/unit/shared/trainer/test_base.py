"""PAMIQ-Core's trainer shape (pamiq_core.md §5.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model import TrainingModelsDict
from shared.state import PersistentStateMixin
from shared.trainer import Trainer, TrainersDict
from tests.unit.shared.model.test_interface import TrainingModelImpl


class TrainerImpl(Trainer):
    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        self.trainable = trainable
        self.events: list[str] = []

    def on_training_models_attached(self) -> None:
        self.model = self.get_training_model("a")

    def is_trainable(self) -> bool:
        return self.trainable

    def setup(self) -> None:
        self.events.append("setup")

    def train(self) -> None:
        self.events.append("train")
        self.model.param += 1

    def teardown(self) -> None:
        self.events.append("teardown")

    def save_state(self, path: Path) -> None:
        self.events.append(f"save {path.name}")


@pytest.fixture
def models() -> TrainingModelsDict:
    return TrainingModelsDict({"a": TrainingModelImpl(), "b": TrainingModelImpl()})


def test_shape() -> None:
    assert issubclass(Trainer, PersistentStateMixin)
    assert Trainer.__abstractmethods__ == frozenset({"train"})


def test_run_is_setup_train_sync_teardown_and_syncs_only_models_looked_up(
    models: TrainingModelsDict,
) -> None:
    trainer = TrainerImpl()
    trainer.attach_training_models(models)
    assert trainer.retrieved_model_names == ["a"]
    assert trainer.run() is True
    assert trainer.events == ["setup", "train", "teardown"]
    assert models["a"].synced == 1 and models["b"].synced == 0
    assert models["a"].inference_model.param == models["a"].param == 2.0


def test_run_does_nothing_when_not_trainable(models: TrainingModelsDict) -> None:
    trainer = TrainerImpl(trainable=False)
    trainer.attach_training_models(models)
    assert trainer.run() is False
    assert trainer.events == []
    assert models["a"].synced == 0


def test_a_model_looked_up_twice_syncs_once(models: TrainingModelsDict) -> None:
    trainer = TrainerImpl()
    trainer.attach_training_models(models)
    trainer.get_training_model("a")
    trainer.sync_models()
    assert models["a"].synced == 1


def test_lookup_before_attach_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no training models attached"):
        TrainerImpl().get_training_model("a")


def test_trainers_dict_propagates(models: TrainingModelsDict, tmp_path: Path) -> None:
    trainers = TrainersDict({"one": TrainerImpl(), "two": TrainerImpl()})
    trainers.attach_training_models(models)
    assert all(t.retrieved_model_names == ["a"] for t in trainers.values())
    trainers.save_state(tmp_path / "trainers")
    assert (tmp_path / "trainers").is_dir()
    assert trainers["one"].events == ["save one"] and trainers["two"].events == ["save two"]
