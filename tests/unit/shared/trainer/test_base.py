"""PAMIQ-Core's trainer shape (pamiq_core.md §5.5, without data users, threads or clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model import TrainingModelsDict
from shared.state import PersistentStateMixin
from shared.trainer import Trainer, TrainersDict
from tests.unit.shared.model.test_interface import InferenceModelImpl, TrainingModelImpl


class LoggedModel(TrainingModelImpl):
    """Logs its syncs into a shared event list."""

    def __init__(self, events: list[str], name: str) -> None:
        super().__init__()
        self.events = events
        self.name = name

    def sync_impl(self, inference_model: InferenceModelImpl) -> None:
        self.events.append(f"sync {self.name}")
        super().sync_impl(inference_model)


class TrainerImpl(Trainer):
    def __init__(self, events: list[str], trainable: bool = True) -> None:
        super().__init__()
        self.events = events
        self.trainable = trainable

    def on_training_models_attached(self) -> None:
        self.events.append("attached")
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


class Minimal(Trainer):
    def train(self) -> None:
        pass


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def models(events: list[str]) -> TrainingModelsDict:
    return TrainingModelsDict(
        {
            "a": LoggedModel(events, "a"),
            "b": LoggedModel(events, "b"),
            "only": TrainingModelImpl(inference_thread_only=True),
        }
    )


def test_shape() -> None:
    assert issubclass(Trainer, PersistentStateMixin)
    assert Trainer.__abstractmethods__ == frozenset({"train"})
    assert Minimal().is_trainable() is True


def test_attach_fires_the_hook_and_get_training_model_returns_the_attached_model(
    events: list[str], models: TrainingModelsDict
) -> None:
    trainer = TrainerImpl(events)
    trainer.attach_training_models(models)
    assert events == ["attached"]
    assert trainer.model is models["a"]
    assert trainer.get_training_model("b") is models["b"]
    assert trainer.retrieved_model_names == ["a", "b"]


def test_get_training_model_refuses_inference_only_and_unattached(
    models: TrainingModelsDict,
) -> None:
    trainer = Minimal()
    with pytest.raises(RuntimeError, match=r"^Minimal has no training models attached yet; "):
        trainer.get_training_model("a")
    trainer.attach_training_models(models)
    with pytest.raises(KeyError, match="model 'only' is inference thread only"):
        trainer.get_training_model("only")
    assert trainer.retrieved_model_names == []


def test_run_is_setup_train_sync_teardown(events: list[str], models: TrainingModelsDict) -> None:
    trainer = TrainerImpl(events)
    trainer.attach_training_models(models)
    events.clear()
    assert trainer.run() is True
    assert events == ["setup", "train", "sync a", "teardown"]
    a = models["a"]
    assert isinstance(a, LoggedModel)
    assert a.inference_model.param == a.param == 2.0


class Unsyncable(LoggedModel):
    """A model whose inference copy cannot be reached: every sync fails."""

    def sync_impl(self, inference_model: InferenceModelImpl) -> None:
        self.events.append(f"sync {self.name} failed")
        raise ConnectionError(f"model {self.name}: no inference service could be reached")


def test_teardown_runs_after_a_sync_that_failed_and_the_failure_is_raised(
    events: list[str],
) -> None:
    trainer = TrainerImpl(events)
    trainer.attach_training_models(TrainingModelsDict({"a": Unsyncable(events, "a")}))
    events.clear()
    with pytest.raises(ConnectionError, match="model a: no inference service could be reached"):
        trainer.run()
    assert events == ["setup", "train", "sync a failed", "teardown"]


def test_run_does_nothing_when_not_trainable(events: list[str], models: TrainingModelsDict) -> None:
    trainer = TrainerImpl(events, trainable=False)
    trainer.attach_training_models(models)
    events.clear()
    assert trainer.run() is False
    assert events == []


def test_sync_models_syncs_each_retrieved_model_once(
    events: list[str], models: TrainingModelsDict
) -> None:
    trainer = TrainerImpl(events)
    trainer.attach_training_models(models)
    trainer.get_training_model("b")
    trainer.get_training_model("a")
    events.clear()
    trainer.sync_models()
    assert events == ["sync a", "sync b"]


def test_sync_models_without_models_does_nothing() -> None:
    Minimal().sync_models()
    assert Minimal().run() is True


def test_save_state_creates_the_directory(tmp_path: Path) -> None:
    trainer = Minimal()
    trainer.save_state(tmp_path / "t")
    trainer.save_state(tmp_path / "t")  # again: the directory may exist
    assert (tmp_path / "t").is_dir()
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["previous_training_time"]
    trainer.load_state(tmp_path / "t")


def test_load_state_of_a_state_saved_before_trainers_had_data(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()  # no previous_training_time: the time stays -inf
    trainer = Minimal()
    trainer.load_state(tmp_path / "t")
    assert trainer._previous_training_time == float("-inf")


class PersistLog(Minimal):
    def __init__(self, log: list[tuple[str, Path]]) -> None:
        super().__init__()
        self.log = log

    def save_state(self, path: Path) -> None:
        self.log.append(("save", path))

    def load_state(self, path: Path) -> None:
        self.log.append(("load", path))


def test_trainers_dict_propagates_attach(events: list[str], models: TrainingModelsDict) -> None:
    trainers = TrainersDict({"one": TrainerImpl(events), "two": TrainerImpl(events)})
    trainers.attach_training_models(models)
    assert events == ["attached", "attached"]
    assert all(t.retrieved_model_names == ["a"] for t in trainers.values())


def test_trainers_dict_saves_and_loads_each_trainer_under_its_name(tmp_path: Path) -> None:
    log: list[tuple[str, Path]] = []
    trainers = TrainersDict({"one": PersistLog(log), "two": PersistLog(log)})
    trainers.save_state(tmp_path / "trainers")
    assert (tmp_path / "trainers").is_dir()
    trainers.save_state(tmp_path / "trainers")  # the service saves into the same place again
    trainers.load_state(tmp_path / "trainers")
    one, two = tmp_path / "trainers" / "one", tmp_path / "trainers" / "two"
    assert log == [
        ("save", one),
        ("save", two),
        ("save", one),
        ("save", two),
        ("load", one),
        ("load", two),
    ]
