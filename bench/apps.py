"""Model definitions for the bench scripts (imported by the inference service they start)."""

from __future__ import annotations

import os

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainingModel


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


app = App()
app.add_model(
    "blocks",
    blocks,
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)
