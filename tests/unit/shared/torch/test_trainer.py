"""PAMIQ-Core's TorchTrainer behaviours (pamiq_core.md §5.4), with safetensors state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR

from shared.model import TrainingModelsDict
from shared.torch import OptimizersSetup, TorchTrainer, TorchTrainingModel
from tests.unit.shared.model.test_interface import TrainingModelImpl


class Trainer(TorchTrainer):
    def __init__(self, with_schedulers: bool = True) -> None:
        super().__init__()
        self.with_schedulers = with_schedulers

    def on_training_models_attached(self) -> None:
        self.model = self.get_torch_training_model("linear", nn.Linear)

    def create_optimizers(self) -> OptimizersSetup:
        optimizer = torch.optim.AdamW(self.model.model.parameters(), lr=0.001)
        if not self.with_schedulers:
            return {"adamw": optimizer}
        return {"adamw": optimizer}, {"exp": ExponentialLR(optimizer, gamma=0.998)}

    def train(self) -> None:
        loss = self.model(torch.randn(4, 3)).pow(2).mean()
        self.optimizers["adamw"].zero_grad()
        loss.backward()
        self.optimizers["adamw"].step()
        if self.lr_schedulers:
            self.lr_schedulers["exp"].step()


def models() -> TrainingModelsDict:
    return TrainingModelsDict(
        {
            "linear": TorchTrainingModel(nn.Linear(3, 2)),
            "conv": TorchTrainingModel(nn.Conv2d(1, 1, 1)),
            "plain": TrainingModelImpl(),
        }
    )


def test_get_torch_training_model_checks_types() -> None:
    trainer = Trainer()
    trainer.attach_training_models(models())
    assert isinstance(trainer.get_torch_training_model("linear"), TorchTrainingModel)
    with pytest.raises(TypeError, match="Model plain is not a instance of TorchTrainingModel"):
        trainer.get_torch_training_model("plain")
    with pytest.raises(TypeError, match="Internal model is not a instance of Conv2d"):
        trainer.get_torch_training_model("linear", nn.Conv2d)


def test_setup_builds_optimizers_and_schedulers() -> None:
    trainer = Trainer()
    trainer.attach_training_models(models())
    trainer.setup()
    assert isinstance(trainer.optimizers["adamw"], torch.optim.AdamW)
    assert trainer.optimizers["adamw"].param_groups[0]["lr"] == 0.001
    assert trainer.lr_schedulers["exp"].gamma == 0.998
    only = Trainer(with_schedulers=False)
    only.attach_training_models(models())
    only.setup()
    assert only.lr_schedulers == {}


def test_optimizer_state_survives_runs_and_syncs() -> None:
    trainer = Trainer()
    trainer.attach_training_models(models())
    for _ in range(3):
        assert trainer.run()
    state = trainer.optimizers["adamw"].state_dict()
    assert state["state"][0]["step"].item() == 3
    assert trainer.lr_schedulers["exp"].last_epoch == 3
    trainer.setup()  # rebuilt from create_optimizers, state restored
    assert trainer.optimizers["adamw"].state_dict()["state"][0]["step"].item() == 3
    assert trainer.optimizers["adamw"].param_groups[0]["lr"] == pytest.approx(0.001 * 0.998**3)


def test_save_and_load_state_without_pickle(tmp_path: Path) -> None:
    trainer = Trainer()
    trainer.attach_training_models(models())
    trainer.run()
    trainer.run()
    trainer.save_state(tmp_path / "trainer")
    assert sorted(p.name for p in (tmp_path / "trainer").iterdir()) == [
        "adamw.optim.safetensors",
        "exp.lrsch.safetensors",
    ]
    restored = Trainer()
    restored.attach_training_models(models())
    restored.load_state(tmp_path / "trainer")
    restored.setup()
    before = trainer.optimizer_states["adamw"]
    after = restored.optimizers["adamw"].state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, values in before["state"].items():
        for key, value in values.items():
            assert torch.equal(after["state"][index][key], value)
    assert restored.lr_schedulers["exp"].last_epoch == 2


def test_load_state_from_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory or does not exist"):
        Trainer().load_state(tmp_path / "nope")
