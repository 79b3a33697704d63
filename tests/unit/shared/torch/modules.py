"""Modules the torch model tests share."""

from __future__ import annotations

import torch
from torch import nn


class CustomModel(nn.Module):
    not_callable = 3

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out

    def custom_inference(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self(x) / temperature
