"""Model definitions for the bench scripts (imported by the inference service they start)."""

from __future__ import annotations

import os

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup


class Blocks(nn.Module):
    """`BENCH_MB` MiB of fp32 weights in `BENCH_TENSORS` equal tensors; output: their sums."""

    def __init__(self, megabytes: int, tensors: int) -> None:
        super().__init__()
        per = megabytes * (1 << 20) // 4 // tensors
        self.blocks = nn.ParameterList(
            [nn.Parameter(torch.zeros(per // 1024, 1024)) for _ in range(tensors)]
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0 + torch.stack([b[0, 0] for b in self.blocks]).sum()


def blocks() -> TorchTrainingModel[Blocks]:
    return TorchTrainingModel(
        Blocks(int(os.environ.get("BENCH_MB", "1024")), int(os.environ.get("BENCH_TENSORS", "64")))
    )


class TiedLM(nn.Module):
    """A small language model shaped as most are: the output projection tied to the token
    embedding (GPT-2's proportions, scaled down: 8192 tokens of 512, four 512-2048-512 MLP
    blocks), so a push that sent each name would send the embedding twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8192, 512)
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
                for _ in range(4)
            ]
        )
        self.norm = nn.LayerNorm(512)
        self.head = nn.Linear(512, 8192, bias=False)
        self.head.weight = self.embed.weight

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.norm(self.blocks(self.embed(x.long())))).sum(-1)
        return logits


app = App()
app.add_model(
    "blocks",
    blocks,
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)
# An app of its own: served beside `blocks`, the extra model slowed bench/sync.py's timed
# pushes (and its raw yardstick) by about a tenth on the two-core host.
tied_app = App()
tied_app.add_model(
    "tiedlm",
    lambda: TorchTrainingModel(TiedLM()),
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)


class Stamp(nn.Module):
    """Eight tensors a trainer fills with one value per run; the output is their means, so a
    response computed on a mix of two versions shows unequal values (the integration tests'
    stamp model too, tests/integration/apps.py)."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        per = max(1, megabytes * (1 << 20) // 4 // 8)
        self.parts = nn.ParameterList([nn.Parameter(torch.zeros(per)) for _ in range(8)])

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0 + torch.stack([p.mean() for p in self.parts]).unsqueeze(0)


class StampTrainer(TorchTrainer):
    """Run n (from 1) sets every tensor of the stamp model to n."""

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.model = self.get_torch_training_model("stamp", Stamp)
        self.count = 0

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {}

    @override
    def train(self) -> None:
        self.count += 1
        with torch.no_grad():
            for p in self.model.model.parts:
                p.fill_(float(self.count))


soak = App()
soak.add_model(
    "stamp",
    lambda: TorchTrainingModel(Stamp(int(os.environ.get("BENCH_MB", "16")))),
    inputs=[TensorSpec("x", "FP32", (-1, 8))],
    outputs=[TensorSpec("means", "FP32", (-1, 8))],
)
soak.add_trainer("stamp", StampTrainer)
