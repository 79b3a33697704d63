"""Apps with experience buffers that the experience-plane tests start trainers with.

`steps`: one buffer of (x, y, id) samples that nothing evicts (the tests check which samples
arrived) and a trainer that fits y = w x on them only once enough new samples arrived. Its
model has no inference copy, so a trainer runs without any inference service.
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

STEPS_TENSORS = [
    TensorSpec("x", "FP32", (1,)),
    TensorSpec("y", "FP32", (1,)),
    TensorSpec("id", "INT64", ()),
]
CAPACITY = 100_000


class FitTrainer(TorchTrainer):
    """A few SGD steps on every sample in the buffer, once 20 new ones arrived."""

    def __init__(self) -> None:
        super().__init__("steps", min_buffer_size=20, min_new_data_count=20)

    @override
    def on_training_models_attached(self) -> None:
        self.line = self.get_torch_training_model("line", nn.Linear)

    @override
    def on_data_users_attached(self) -> None:
        self.steps = self.get_data_user("steps")

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.line.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        data = self.steps.get_data()
        x, y = torch.stack(data["x"]), torch.stack(data["y"])
        for _ in range(3):
            loss = nn.functional.mse_loss(self.line(x), y)
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()


steps = App()
steps.add_model("line", lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
steps.add_buffer(
    "steps", lambda: DictSequentialBuffer(["x", "y", "id"], CAPACITY), tensors=STEPS_TENSORS
)
steps.add_trainer("fit", FitTrainer)
