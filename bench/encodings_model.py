"""The model bench/encodings.py measures and its cases, and `lab_app`: what every replica host
serves in `--lab` (the model as `lab_bf16`, served in bf16, `lab_fp32`, and `lab_whole`, fp32,
which the yardstick's whole pushes go to)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainingModel

TENSOR_MB = 16  # the model is cut into tensors of this size
LAB_BF16, LAB_FP32 = "lab_bf16", "lab_fp32"
LAB_WHOLE = "lab_whole"  # fp32, pushed whole: the yardstick, interleaved with each case's steps


@dataclass(frozen=True)
class Case:
    name: str
    lr: float
    served: torch.dtype | None  # None: as trained (fp32)
    versus_fp32: bool  # bytes_ratio against whole fp32 tensors rather than served ones


CASES = (
    Case("bf16_adam_lr1e-6", 1e-6, torch.bfloat16, False),
    Case("fp32_adam_lr1e-3", 1e-3, None, False),
    Case("fp32_served_bf16", 1e-4, torch.bfloat16, True),
)


def selected(names: str | None) -> tuple[Case, ...]:
    """The cases named (comma-separated), in CASES order; every one for None."""
    if not names:
        return CASES
    wanted = set(names.split(","))
    unknown = wanted - {case.name for case in CASES}
    if unknown:
        raise ValueError(f"no such case: {', '.join(sorted(unknown))}")
    return tuple(case for case in CASES if case.name in wanted)


class LabWeights(nn.Module):
    """`BENCH_ENC_MB` MiB of fp32 weights in tensors of TENSOR_MB MiB; output: one sum."""

    def __init__(self, mb: int | None = None) -> None:
        super().__init__()
        mb = mb if mb is not None else int(os.environ.get("BENCH_ENC_MB", "256"))
        count = max(1, mb // TENSOR_MB)
        per = min(mb, TENSOR_MB) * (1 << 20) // 4
        self.w = nn.ParameterList([nn.Parameter(torch.zeros(per)) for _ in range(count)])

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x * 0 + self.w[0][0].float()
        return out


def _serve(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = module(x).float()
    return out


lab_app = App()
for _name, _dtype in ((LAB_BF16, torch.bfloat16), (LAB_FP32, None), (LAB_WHOLE, None)):
    lab_app.add_model(
        _name,
        lambda: TorchTrainingModel(LabWeights(), inference_procedure=_serve),
        inputs=[TensorSpec("x", "FP32", (-1, 1))],
        outputs=[TensorSpec("y", "FP32", (-1, 1))],
        served_dtype=_dtype,
    )
