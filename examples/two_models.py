"""Two models, each with a trainer of its own: the example docker-compose.yml deploys.

`sine` learns y = sin(3x) and `cosine` learns y = cos(3x). One inference service (or several
replicas of it) serves both; each model is written by its own trainer process, which runs only
the trainer named in TRAINER_TRAINERS, so the two train side by side and scale apart:

    inference-service --models examples.two_models:app
    trainer-service --models examples.two_models:app --trainers sine --state-dir state/sine
    trainer-service --models examples.two_models:app --trainers cosine --state-dir state/cosine
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from typing_extensions import override

from examples.quickstart import SineNet
from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

CURVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sine": lambda x: torch.sin(3 * x),
    "cosine": lambda x: torch.cos(3 * x),
}

app = App()


class CurveTrainer(TorchTrainer):
    """Each run: `steps` Adam steps on fresh noisy samples of one curve, x in [-2, 2]."""

    def __init__(self, model_name: str, steps: int = 50, batch_size: int = 64) -> None:
        super().__init__()
        self.model_name = model_name
        self.curve = CURVES[model_name]
        self.steps = steps
        self.batch_size = batch_size

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
            y = self.curve(x) + 0.05 * torch.randn_like(x)
            loss = nn.functional.mse_loss(self.model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _build() -> TorchTrainingModel[SineNet]:
    return TorchTrainingModel(SineNet())


for _name in CURVES:
    app.add_model(
        _name,
        _build,
        inputs=[TensorSpec("x", "FP32", (-1, 1))],
        outputs=[TensorSpec("y", "FP32", (-1, 1))],
    )
    app.add_trainer(_name, functools.partial(CurveTrainer, _name))
