"""Quickstart: a small MLP learns y = sin(3x) online while it is being served.

Its trainer draws fresh noisy samples of the function on every run, takes some optimizer steps,
and the trainer service then pushes the new weights; querying the inference service shows the
served version rise and the error fall.

    inference-service --models examples.quickstart:app
    trainer-service --models examples.quickstart:app
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup


class SineNet(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(1, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 1),
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


def target(x: torch.Tensor) -> torch.Tensor:
    """The function the model learns."""
    return torch.sin(3 * x)


app = App()


@app.model(
    "quickstart",
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)
def quickstart() -> TorchTrainingModel[SineNet]:
    return TorchTrainingModel(SineNet())


class QuickstartTrainer(TorchTrainer):
    """Each run: `steps` Adam steps on fresh samples of sin(3x) + noise, x in [-2, 2]."""

    model_name = "quickstart"

    def __init__(self, steps: int = 50, batch_size: int = 64, noise: float = 0.05) -> None:
        super().__init__()
        self.steps = steps
        self.batch_size = batch_size
        self.noise = noise

    def curve(self, x: torch.Tensor) -> torch.Tensor:
        """The function to learn."""
        return target(x)

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.model = self.get_torch_training_model(self.model_name, SineNet)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"adam": torch.optim.Adam(self.model.model.parameters(), lr=3e-3)}

    @override
    def train(self) -> None:
        optimizer = self.optimizers["adam"]
        device = next(self.model.model.parameters()).device
        for _ in range(self.steps):
            x = torch.rand(self.batch_size, 1, device=device) * 4 - 2
            y = self.curve(x) + self.noise * torch.randn_like(x)
            loss = nn.functional.mse_loss(self.model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


app.add_trainer("quickstart", QuickstartTrainer)
