"""A model trained in fp32 and served in bf16, for the encoding and served-dtype tests.

Both services import this module (`tests.integration.encoding_apps:served_bf16`). TEST_LR sets
the trainer's Adam learning rate (default 1e-6: a few percent of the bf16 elements move per run);
TEST_LR_LATER=`RUN:LR` changes it to LR from run RUN on.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

WIDTH = 256


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 4))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def serve_bf16(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the bf16 inference copy on fp32 inputs; answer in fp32."""
    out: torch.Tensor = module(x.to(torch.bfloat16)).float()
    return out


class AdamTrainer(TorchTrainer):
    """A few Adam steps on random data per run."""

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.model = self.get_torch_training_model("wide", Wide)
        self.runs = 0

    @override
    def create_optimizers(self) -> OptimizersSetup:
        lr = float(os.environ.get("TEST_LR", "1e-6"))
        return {"adam": torch.optim.Adam(self.model.model.parameters(), lr=lr)}

    @override
    def train(self) -> None:
        self.runs += 1
        later = os.environ.get("TEST_LR_LATER")
        if later and self.runs == int(later.split(":")[0]):
            for group in self.optimizers["adam"].param_groups:
                group["lr"] = float(later.split(":")[1])
        g = torch.Generator().manual_seed(self.runs)
        for _ in range(3):
            x = torch.randn(16, WIDTH, generator=g)
            loss = self.model(x).pow(2).mean()
            self.optimizers["adam"].zero_grad()
            loss.backward()
            self.optimizers["adam"].step()


served_bf16 = App()
served_bf16.add_model(
    "wide",
    lambda: TorchTrainingModel(Wide(), inference_procedure=serve_bf16),
    inputs=[TensorSpec("x", "FP32", (-1, WIDTH))],
    outputs=[TensorSpec("y", "FP32", (-1, 4))],
    served_dtype=torch.bfloat16,
)
served_bf16.add_trainer("adam", AdamTrainer)
