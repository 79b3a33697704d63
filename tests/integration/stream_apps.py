"""Apps of the outside review of the data plane (test_review_stream.py).

`widths`: a model that takes rows of any width, recording its inputs into a buffer whose samples
hold two values: only requests of rows two wide can be recorded there.
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainingModel


class Scale(nn.Module):
    """Its input times a learnable scale of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


widths = App()
widths.add_model(
    "wide",
    lambda: TorchTrainingModel(Scale()),
    inputs=[TensorSpec("x", "FP32", (-1, -1))],
    outputs=[TensorSpec("y", "FP32", (-1, -1))],
    record="pairs",
)
widths.add_buffer(
    "pairs",
    lambda: DictSequentialBuffer(["x"], 1000),
    tensors=[TensorSpec("x", "FP32", (2,))],
)
