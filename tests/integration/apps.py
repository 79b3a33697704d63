"""Model definitions the integration tests start real services with.

Both services import this module (the import string is `tests.integration.apps:<name>`).
Settings come from environment variables the tests set: TEST_PRETRAINED (a safetensors file for
the inference-only model) and TEST_STAMP_MB (size of the stamp model).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from bench.apps import Stamp, StampTrainer
from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel, get_device
from shared.torch.trainer import OptimizersSetup


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class SgdTrainer(TorchTrainer):
    """A few SGD steps on a fixed regression task per run."""

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.model = self.get_torch_training_model("mlp", MLP)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.model.model.parameters(), lr=0.05, momentum=0.9)}

    @override
    def train(self) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=g).to(get_device(self.model.model))
        y = x[:, :2] * 2 - x[:, 2:]
        for _ in range(5):
            loss = nn.functional.mse_loss(self.model(x), y)
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()


def frozen_model() -> TorchTrainingModel[MLP]:
    return TorchTrainingModel(
        MLP(), inference_thread_only=True, pretrained_parameter_file=os.environ["TEST_PRETRAINED"]
    )


def training_only() -> TorchTrainingModel[MLP]:
    return TorchTrainingModel(MLP(), has_inference_model=False)


MLP_IO = {
    "inputs": [TensorSpec("x", "FP32", (-1, 4))],
    "outputs": [TensorSpec("y", "FP32", (-1, 2))],
}

pair = App()
pair.add_model("mlp", lambda: TorchTrainingModel(MLP()), **MLP_IO)
pair.add_model("frozen", frozen_model, **MLP_IO)
pair.add_model("scratch", training_only)
pair.add_trainer("sgd", SgdTrainer)

stamp = App()
stamp.add_model(
    "stamp",
    lambda: TorchTrainingModel(Stamp(int(os.environ.get("TEST_STAMP_MB", "4")))),
    inputs=[TensorSpec("x", "FP32", (-1, 8))],
    outputs=[TensorSpec("means", "FP32", (-1, 8))],
)
stamp.add_trainer("stamp", StampTrainer)

catalogue = App()
catalogue.add_model(
    "stamp",
    lambda: TorchTrainingModel(Stamp(int(os.environ.get("TEST_STAMP_MB", "1")))),
    inputs=[TensorSpec("x", "FP32", (-1, 8))],
    outputs=[TensorSpec("means", "FP32", (-1, 8))],
)
catalogue.add_model("frozen", frozen_model, **MLP_IO)


class Words(nn.Module):
    """BYTES in and out: each string upper-cased, and its length times a learnable scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    @override
    def forward(self, text: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:  # type: ignore[type-arg]
        flat = text.reshape(-1)
        upper = np.array([t.upper() for t in flat], dtype=object)
        lengths = torch.tensor([float(len(t)) for t in flat], device=self.scale.device)
        return upper.reshape(text.shape), (lengths * self.scale).reshape(text.shape)


text = App()
text.add_model(
    "words",
    lambda: TorchTrainingModel(Words()),
    inputs=[TensorSpec("text", "BYTES", (-1,))],
    outputs=[TensorSpec("upper", "BYTES", (-1,)), TensorSpec("length", "FP32", (-1,))],
)


class Sleepy(nn.Module):
    """Sleeps for as many seconds as the first input value says, then answers it back."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(x.flatten()[0]))
        return x * self.scale


sleepy = App()
sleepy.add_model(
    "sleepy",
    lambda: TorchTrainingModel(Sleepy(), inference_thread_only=True),
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)


def hold_at_gate() -> None:
    """While the file TEST_GATE names exists, wait, having created `<gate>.held`: a test holds a
    model busy this way while it queues requests behind it."""
    gate = os.environ.get("TEST_GATE")
    if not gate or not os.path.exists(gate):
        return
    with open(f"{gate}.held", "w"):
        pass
    while os.path.exists(gate):
        time.sleep(0.005)


class Echo(nn.Module):
    """Answers each input back (tensors times a learnable scale of 1, which keeps them
    bit-exact; BYTES as they are), after waiting at the gate: each request must get back its
    own rows, whatever it was batched with."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    @override
    def forward(self, *inputs: torch.Tensor | np.ndarray) -> object:  # type: ignore[type-arg]
        hold_at_gate()
        out = [t * self.scale if isinstance(t, torch.Tensor) else t for t in inputs]
        return out[0] if len(out) == 1 else tuple(out)


def echo(
    name: str, datatype: str, shape: tuple[int, ...], inputs: tuple[str, ...] = ("x",)
) -> None:
    holes.add_model(
        name,
        lambda: TorchTrainingModel(Echo(), inference_thread_only=True),
        inputs=[TensorSpec(i, datatype, shape) for i in inputs],
        outputs=[TensorSpec(f"{i}_out", datatype, shape) for i in inputs],
    )


# The data plane's holes (test_dataplane_holes.py): sizes that differ beyond the batch
# dimension, two inputs, a shape of rank 3, and a model that is never batched.
holes = App()
echo("ragged", "FP32", (-1, -1))
echo("two", "FP32", (-1, 2), inputs=("x", "y"))
echo("cube", "FP32", (-1, -1, -1))
echo("cube_text", "BYTES", (-1, -1, -1))
echo("fixed", "FP32", (1, 4))
