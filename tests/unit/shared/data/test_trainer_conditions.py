"""PAMIQ-Core's trainer data path (tests/pamiq_core/trainer/test_base.py, torch/test_trainer.py):
data users attached and looked up, and whether a run trains (`training_condition_data_user`,
`min_buffer_size`, `min_new_data_count`), with real buffers and the real clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typing_extensions import override

from shared.data import DataUsersDict, SequentialBuffer
from shared.model import TrainingModelsDict
from shared.torch import TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup
from shared.trainer import Trainer, TrainersDict
from tests.unit.shared.data.helpers import mark


class DataTrainer(Trainer):
    def __init__(self, *args: object, **kwds: object) -> None:
        super().__init__(*args, **kwds)  # type: ignore[arg-type]
        self.trained = 0

    @override
    def on_data_users_attached(self) -> None:
        self.user = self.get_data_user("data")

    @override
    def train(self) -> None:
        self.trained += 1


@pytest.fixture
def users() -> DataUsersDict:
    return DataUsersDict.from_data_buffers(data=SequentialBuffer[int](100))


def conditional(users: DataUsersDict) -> DataTrainer:
    trainer = DataTrainer(
        training_condition_data_user="data", min_buffer_size=5, min_new_data_count=3
    )
    trainer.attach_data_users(users)
    return trainer


def collect(users: DataUsersDict, count: int) -> None:
    for i in range(count):
        users.data_collectors_dict["data"].collect(i)


def test_attach_data_users_fires_the_hook_and_get_data_user_returns_it(
    users: DataUsersDict,
) -> None:
    trainer = DataTrainer()
    trainer.attach_data_users(users)
    assert trainer.user is users["data"]
    assert trainer.get_data_user("data") is users["data"]


def test_get_data_user_refuses_unattached_and_unknown(users: DataUsersDict) -> None:
    trainer = DataTrainer()
    with pytest.raises(RuntimeError, match=r"^DataTrainer has no data users attached yet; "):
        trainer.get_data_user("data")
    trainer.attach_data_users(users)
    with pytest.raises(KeyError, match="no data user \\(buffer\\) named 'other'; there are: data"):
        trainer.get_data_user("other")


def test_without_a_condition_every_run_trains(users: DataUsersDict) -> None:
    trainer = DataTrainer()
    trainer.attach_data_users(users)
    assert trainer.is_trainable() is True
    assert trainer.run() is True
    assert trainer.trained == 1


def test_trainable_once_enough_data_arrived_and_the_update_moves_it_in(
    users: DataUsersDict,
) -> None:
    trainer = conditional(users)
    collect(users, 5)
    assert len(users["data"]) == 0  # collected, not yet moved into the buffer
    assert trainer.is_trainable() is True  # first check: everything since -inf is new
    assert len(users["data"]) == 5


def test_too_small_a_buffer_is_not_trainable(users: DataUsersDict) -> None:
    trainer = conditional(users)
    collect(users, 4)
    assert trainer.is_trainable() is False
    assert len(users["data"]) == 4  # updated all the same


def test_new_data_counts_from_the_last_check_that_returned_true(users: DataUsersDict) -> None:
    trainer = conditional(users)
    collect(users, 5)
    assert trainer.is_trainable() is True
    assert trainer.is_trainable() is False  # nothing new since
    collect(users, 2)
    assert trainer.is_trainable() is False  # 2 new < 3
    collect(users, 1)
    assert trainer.is_trainable() is True  # 3 new since the last True
    assert trainer.is_trainable() is False


def test_the_time_recorded_is_that_of_the_check(users: DataUsersDict) -> None:
    trainer = conditional(users)
    collect(users, 5)
    before = mark()
    assert trainer.is_trainable() is True
    after = mark()
    assert before < trainer._previous_training_time <= after


def test_run_skips_setup_and_train_when_not_trainable(users: DataUsersDict) -> None:
    trainer = conditional(users)
    collect(users, 4)
    assert trainer.run() is False
    assert trainer.trained == 0
    collect(users, 1)
    assert trainer.run() is True
    assert trainer.trained == 1


def test_a_condition_naming_no_buffer_fails_at_the_check(users: DataUsersDict) -> None:
    trainer = DataTrainer(training_condition_data_user="missing")
    trainer.attach_data_users(users)
    with pytest.raises(KeyError, match="no data user \\(buffer\\) named 'missing'"):
        trainer.is_trainable()


def test_previous_training_time_is_saved_as_text_and_loaded(
    users: DataUsersDict, tmp_path: Path
) -> None:
    trainer = conditional(users)
    trainer.save_state(tmp_path / "t")
    assert (tmp_path / "t" / "previous_training_time").read_text("utf-8") == "-inf"
    collect(users, 5)
    assert trainer.is_trainable() is True
    trainer.save_state(tmp_path / "t")
    restored = conditional(users)
    restored.load_state(tmp_path / "t")
    assert restored._previous_training_time == trainer._previous_training_time
    assert restored.is_trainable() is False  # nothing new since the saved time
    (tmp_path / "t" / "previous_training_time").write_text("soon")
    with pytest.raises(ValueError, match="previous_training_time holds 'soon', not a time"):
        restored.load_state(tmp_path / "t")


def test_trainers_dict_attaches_data_users_to_every_trainer(users: DataUsersDict) -> None:
    trainers = TrainersDict({"one": DataTrainer(), "two": DataTrainer()})
    trainers.attach_data_users(users)
    assert all(t.user is users["data"] for t in trainers.values())  # type: ignore[attr-defined]


class LinearTrainer(TorchTrainer):
    @override
    def on_training_models_attached(self) -> None:
        self.linear = self.get_torch_training_model("linear", torch.nn.Linear)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.linear.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        self.trained = True


def test_torch_trainer_takes_the_conditions(users: DataUsersDict) -> None:
    trainer = LinearTrainer("data", min_buffer_size=2, min_new_data_count=2)
    trainer.attach_training_models(
        TrainingModelsDict({"linear": TorchTrainingModel(torch.nn.Linear(2, 2))})
    )
    trainer.attach_data_users(users)
    assert trainer.run() is False
    collect(users, 2)
    assert trainer.run() is True
    assert trainer.trained
