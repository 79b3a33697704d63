"""Apps of careless users, for test_review_training.py.

Both services import this module (`tests.integration.training_apps:<app>`). Environment
variables the tests give the trainer: TEST_RAISE_AT, the run (1-based) whose train() raises;
TEST_LOAD_SLEEP, seconds `eager`'s trainer takes to load its state; TEST_GATE, a file
`midsync`'s trainer waits at (creating `<gate>.held`) while it exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

IO = {
    "inputs": [TensorSpec("x", "FP32", (-1, 4))],
    "outputs": [TensorSpec("y", "FP32", (-1, 4))],
}
X = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))


class Net(nn.Module):
    """A linear layer and BatchNorm (running stats are buffers)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.lin(x))
        return out


def _env_int(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


class CarelessTrainer(TorchTrainer):
    """Two SGD steps per run; train() raises at run TEST_RAISE_AT."""

    runs = 0

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.net = self.get_torch_training_model("net", Net)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.net.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        self.runs += 1
        module = self.net.model
        for _ in range(2):
            loss = module(X).pow(2).mean()
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()
        if self.runs == _env_int("TEST_RAISE_AT"):
            raise RuntimeError(f"boom at run {self.runs}")


careless = App()
careless.add_model("net", lambda: TorchTrainingModel(Net()), **IO)
careless.add_trainer("careless", CarelessTrainer)


class EagerSyncTrainer(CarelessTrainer):
    """Syncs its model as soon as it has it, as harmless in PAMIQ (a local swap)."""

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.net.sync()

    @override
    def load_state(self, path: Path) -> None:
        """Load as usual, then take TEST_LOAD_SLEEP seconds (a large optimizer state would)."""
        super().load_state(path)
        time.sleep(float(os.environ.get("TEST_LOAD_SLEEP", "0") or 0))


eager = App()
eager.add_model("net", lambda: TorchTrainingModel(Net()), **IO)
eager.add_trainer("eager", EagerSyncTrainer)


class StarvedTrainer(CarelessTrainer):
    """Trains only once 10 samples arrived in the buffer `steps`; none ever does."""

    def __init__(self) -> None:
        super().__init__("steps", min_buffer_size=10, min_new_data_count=10)


starved = App()
starved.add_model("net", lambda: TorchTrainingModel(Net()), **IO)
starved.add_buffer(
    "steps",
    lambda: DictSequentialBuffer(["x"], 100),
    tensors=[TensorSpec("x", "FP32", (4,))],
)
starved.add_trainer("starved", StarvedTrainer)


class OtherTrainer(CarelessTrainer):
    """A second trainer of the model `net`."""


shared_model = App()
shared_model.add_model("net", lambda: TorchTrainingModel(Net()), **IO)
shared_model.add_trainer("a", CarelessTrainer)
shared_model.add_trainer("b", OtherTrainer)


class Lazy(nn.Module):
    """nn.LazyLinear: its weight has no shape until the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.LazyLinear(4)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


class LazyTrainer(TorchTrainer):
    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.lazy = self.get_torch_training_model("lazy", Lazy)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.lazy.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        loss = self.lazy.model(X).pow(2).mean()
        self.optimizers["sgd"].zero_grad()
        loss.backward()
        self.optimizers["sgd"].step()


lazy = App()
lazy.add_model("lazy", lambda: TorchTrainingModel(Lazy()), **IO)
lazy.add_trainer("lazy", LazyTrainer)


class MidSyncTrainer(CarelessTrainer):
    """Syncs half-way through each run, as a long train() does to serve fresher weights: one
    SGD step, `sync()`, another step. Waits first at the gate TEST_GATE while it exists."""

    def _step(self) -> None:
        loss = self.net.model(X).pow(2).mean()
        self.optimizers["sgd"].zero_grad()
        loss.backward()
        self.optimizers["sgd"].step()

    @override
    def train(self) -> None:
        gate = os.environ.get("TEST_GATE")
        if gate and os.path.exists(gate):
            with open(f"{gate}.held", "w"):
                pass
            while os.path.exists(gate):
                time.sleep(0.01)
        self._step()
        self.net.sync()
        self._step()


midsync = App()
midsync.add_model("net", lambda: TorchTrainingModel(Net()), **IO)
midsync.add_trainer("midsync", MidSyncTrainer)


class FlakySyncModel(TorchTrainingModel[Net]):
    """A user's TorchTrainingModel whose sync_impl raises at its call TEST_RAISE_AT (1-based;
    the trainer service's catch-up sync at start is call 1)."""

    calls = 0

    @override
    def sync_impl(self, inference_model: Any) -> None:
        self.calls += 1
        if self.calls == _env_int("TEST_RAISE_AT"):
            raise RuntimeError(f"sync boom at call {self.calls}")
        super().sync_impl(inference_model)


flaky_sync = App()
flaky_sync.add_model("net", lambda: FlakySyncModel(Net()), **IO)
flaky_sync.add_trainer("careless", CarelessTrainer)
