"""The serving benchmark's model: an MLP 64 -> 256 -> 10, and apps that serve it."""

from __future__ import annotations

import os

import torch
from torch import nn
from typing_extensions import override


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def app():  # type: ignore[no-untyped-def]
    """Built lazily: MLServer's environment imports this module without our `shared` package."""
    from bench.apps import Blocks
    from shared import App, TensorSpec, TorchTrainingModel

    served = App()
    served.add_model(
        "mlp",
        lambda: TorchTrainingModel(
            MLP(),
            inference_thread_only=True,
            pretrained_parameter_file=os.environ["BENCH_MLP_WEIGHTS"],
        ),
        inputs=[TensorSpec("x", "FP32", (-1, 64))],
        outputs=[TensorSpec("y", "FP32", (-1, 10))],
    )
    served.add_model(
        "blob",
        lambda: TorchTrainingModel(Blocks(int(os.environ.get("BENCH_BLOB_MB", "100")), 10)),
        inputs=[TensorSpec("x", "FP32", (-1, 1))],
        outputs=[TensorSpec("y", "FP32", (-1, 1))],
    )
    served.add_trainer("blob", _blob_trainer())
    return served


def _blob_trainer() -> type:
    from shared import TorchTrainer

    class BlobTrainer(TorchTrainer):
        """Changes every tensor of the 100 MB model on each run, so each sync carries it all."""

        def on_training_models_attached(self) -> None:
            self.model = self.get_torch_training_model("blob")
            self.value = 0.0

        def create_optimizers(self):  # type: ignore[no-untyped-def]
            return {}

        def train(self) -> None:
            self.value += 1
            with torch.no_grad():
                for p in self.model.model.parameters():
                    p.fill_(self.value)

    return BlobTrainer
