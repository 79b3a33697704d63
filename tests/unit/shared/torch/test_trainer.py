"""PAMIQ-Core's TorchTrainer (pamiq_core.md §5.4), with its state in safetensors, not pickle."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR

from shared.model import TrainingModelsDict
from shared.torch import OptimizersSetup, TorchTrainer, TorchTrainingModel
from tests.unit.shared.model.test_interface import TrainingModelImpl
from trainer_service.publisher import Publisher
from trainer_service.remote import PublishedInferenceModel
from trainer_service.sync_errors import SyncFailedError


class LinearTrainer(TorchTrainer):
    def __init__(self, with_schedulers: bool = True) -> None:
        super().__init__()
        self.with_schedulers = with_schedulers

    def on_training_models_attached(self) -> None:
        self.linear = self.get_torch_training_model("linear", nn.Linear)

    def create_optimizers(self) -> OptimizersSetup:
        optimizer = torch.optim.AdamW(self.linear.model.parameters(), lr=0.001)
        if not self.with_schedulers:
            return {"adamw": optimizer}
        return {"adamw": optimizer}, {"exp": ExponentialLR(optimizer, gamma=0.998)}

    def train(self) -> None:
        device = self.linear.model.weight.device
        x = torch.linspace(-1.0, 1.0, 12, device=device).reshape(4, 3)
        loss = self.linear(x).pow(2).mean()
        self.optimizers["adamw"].zero_grad()
        loss.backward()
        self.optimizers["adamw"].step()
        if self.lr_schedulers:
            self.lr_schedulers["exp"].step()


def make_models(device: torch.device | str = "cpu") -> TrainingModelsDict:
    torch.manual_seed(0)
    return TrainingModelsDict(
        {
            "linear": TorchTrainingModel(nn.Linear(3, 2), device=device),
            "conv": TorchTrainingModel(nn.Conv2d(1, 1, 1)),
            "plain": TrainingModelImpl(),
        }
    )


def attached(trainer: LinearTrainer, device: torch.device | str = "cpu") -> LinearTrainer:
    trainer.attach_training_models(make_models(device))
    return trainer


def test_get_torch_training_model_checks_types() -> None:
    models = make_models()
    trainer = LinearTrainer()
    trainer.attach_training_models(models)
    assert trainer.get_torch_training_model("conv") is models["conv"]
    assert trainer.get_torch_training_model("linear", nn.Linear) is models["linear"]
    assert trainer.retrieved_model_names == ["linear", "conv"]
    with pytest.raises(TypeError, match=r"^Model plain is not a instance of TorchTrainingModel$"):
        trainer.get_torch_training_model("plain")
    with pytest.raises(TypeError, match=r"^Internal model is not a instance of Conv2d$"):
        trainer.get_torch_training_model("linear", nn.Conv2d)


def test_setup_builds_optimizers_and_schedulers_over_the_current_module() -> None:
    trainer = attached(LinearTrainer())
    trainer.setup()
    optimizer = trainer.optimizers["adamw"]
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 0.001
    assert optimizer.param_groups[0]["params"] == list(trainer.linear.model.parameters())
    scheduler = trainer.lr_schedulers["exp"]
    assert type(scheduler) is ExponentialLR and scheduler.gamma == 0.998
    assert scheduler.optimizer is optimizer
    only = attached(LinearTrainer(with_schedulers=False))
    only.setup()
    assert list(only.optimizers) == ["adamw"] and only.lr_schedulers == {}


def test_teardown_keeps_states_that_the_next_setup_restores() -> None:
    trainer = attached(LinearTrainer())
    trainer.setup()
    trainer.optimizers["adamw"].param_groups[0]["lr"] = 0.123
    trainer.teardown()
    assert trainer.optimizer_states["adamw"]["param_groups"][0]["lr"] == 0.123
    assert trainer.lr_scheduler_states["exp"]["last_epoch"] == 0
    trainer.setup()
    assert trainer.optimizers["adamw"].param_groups[0]["lr"] == 0.123


def test_training_goes_on_across_local_syncs() -> None:
    trainer = attached(LinearTrainer())
    for step in range(1, 4):
        before = trainer.linear.model.weight.detach().clone()
        assert trainer.run()
        weight = trainer.linear.model.weight
        assert not torch.equal(weight, before)  # the optimizer steps the current module
        assert torch.equal(trainer.linear.inference_model._raw_model.weight, weight)
        assert trainer.optimizers["adamw"].state_dict()["state"][0]["step"].item() == step
    assert trainer.lr_schedulers["exp"].last_epoch == 3
    trainer.setup()  # rebuilt from create_optimizers, state restored
    assert trainer.optimizers["adamw"].state_dict()["state"][0]["step"].item() == 3
    assert trainer.optimizers["adamw"].param_groups[0]["lr"] == pytest.approx(0.001 * 0.998**3)


def test_a_failed_remote_sync_keeps_the_optimizer_state_of_the_run() -> None:
    """The run's optimizer step survives a sync that reached no inference service: teardown
    still keeps the state, so the next run resumes from it, as after a sync that succeeded."""
    with socket.create_server(("127.0.0.1", 0)) as closed:  # an address nothing listens on
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    publisher = Publisher([dead], "trainer-x", connect_timeout_s=0.2)
    try:
        models = make_models()
        models["linear"].attach_inference_model(PublishedInferenceModel("linear", publisher))
        trainer = LinearTrainer()
        trainer.attach_training_models(models)
        for step in (1, 2):
            with pytest.raises(SyncFailedError, match="no inference service could be reached"):
                trainer.run()
            assert trainer.optimizer_states["adamw"]["state"][0]["step"].item() == step
            assert trainer.lr_scheduler_states["exp"]["last_epoch"] == step
    finally:
        publisher.close()


def test_setup_refuses_a_kept_state_without_its_optimizer() -> None:
    trainer = attached(LinearTrainer())
    trainer.optimizer_states["sgd"] = {}
    with pytest.raises(
        KeyError,
        match=re.escape(
            "there is a kept optimizer state named 'sgd' but create_optimizers returned no "
            "optimizer of that name (it returned ['adamw'])"
        ),
    ):
        trainer.setup()


def test_save_and_load_state_restores_exactly(tmp_path: Path, device: torch.device) -> None:
    trainer = attached(LinearTrainer(), device)
    trainer.run()
    trainer.run()
    trainer.save_state(tmp_path / "trainer")
    files = sorted((tmp_path / "trainer").iterdir())
    assert [f.name for f in files] == [
        "adamw.optim.safetensors",
        "exp.lrsch.safetensors",
        "previous_training_time",  # Trainer's: "-inf", no condition
    ]
    assert files[2].read_text() == "-inf"
    for file in files[:2]:  # safetensors: an 8-byte header length, then a JSON header
        data = file.read_bytes()
        (header_length,) = struct.unpack("<Q", data[:8])
        assert data[8:9] == b"{" and 8 + header_length <= len(data)

    restored = attached(LinearTrainer(), device)
    restored.linear.model.load_state_dict(trainer.linear.model.state_dict())
    restored.load_state(tmp_path / "trainer")
    restored.setup()
    before = trainer.optimizers["adamw"].state_dict()
    after = restored.optimizers["adamw"].state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["param_groups"][0]["lr"] == pytest.approx(0.001 * 0.998**2)
    assert list(after["state"]) == [0, 1]
    for index, values in before["state"].items():
        assert list(after["state"][index]) == list(values)
        for key, value in values.items():
            assert after["state"][index][key].device == value.device
            assert torch.equal(after["state"][index][key], value), (index, key)
    assert restored.lr_schedulers["exp"].state_dict() == trainer.lr_schedulers["exp"].state_dict()
    assert restored.lr_schedulers["exp"].last_epoch == 2

    restored.train()  # the next step is the one the original trainer would take
    restored.sync_models()
    restored.teardown()
    trainer.run()
    assert torch.equal(restored.linear.model.weight, trainer.linear.model.weight)


def test_load_state_from_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=rf"^Path {re.escape(str(tmp_path / 'nope'))} is not a directory or "
    ):
        LinearTrainer().load_state(tmp_path / "nope")
