"""Models as users write them, for the whole sync path (test_review_models.py).

Both services import this module (`tests.integration.user_models:<app>`). Each model's forward
reads every tensor that travels, so a served copy that differs anywhere answers differently.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

IO = {
    "inputs": [TensorSpec("x", "FP32", (-1, 8))],
    "outputs": [TensorSpec("y", "FP32", (-1, 16))],
}


class TiedLM(nn.Module):
    """An LM head tied to the embedding, a layer registered twice, a buffer aliasing a
    parameter, BatchNorm (int64 num_batches_tracked), a 0-d parameter, a zero-size buffer and
    a bool buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.proj = nn.Linear(8, 8)
        self.again = self.proj  # the same layer under a second name
        self.register_buffer("alias", self.proj.bias.data)  # a buffer aliasing a parameter
        self.bn = nn.BatchNorm1d(8)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("nothing", torch.zeros(0, 4))
        self.register_buffer("mask", torch.ones(8, dtype=torch.bool))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        h = self.bn(self.again(x)) * self.scale * self.mask.to(x.dtype)
        h = h + self.emb.weight.mean(0) + self.alias + self.nothing.sum()
        y: torch.Tensor = self.head(h)
        return y.float()


class Transposed(nn.Module):
    """A parameter kept transposed (`p.data = p.data.t()`): it is not contiguous, and it is
    registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 8))
        self.w.data = self.w.data.t()  # (8, 16), not contiguous
        self.again = self.w  # and registered twice
        self.b = nn.Parameter(torch.zeros(16))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = x.to(self.w.dtype) @ self.w + self.b
        return y.float()


class UserTrainer(TorchTrainer):
    """A few SGD steps per run on every model it is given; flips the bool buffer each run."""

    def __init__(self, name: str, module: type[nn.Module]) -> None:
        super().__init__()
        self._name = name
        self._module = module

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.model = self.get_torch_training_model(self._name, self._module)

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.model.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        module = self.model.model
        dtype = next(module.parameters()).dtype
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 8, generator=g).to(dtype)
        for _ in range(3):
            loss = module(x).pow(2).mean()
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()
        mask = getattr(module, "mask", None)
        if isinstance(mask, torch.Tensor):
            mask[0] = ~mask[0]


def _trainer(name: str, module: type[nn.Module]) -> type[UserTrainer]:
    class Trainer(UserTrainer):
        def __init__(self) -> None:
            super().__init__(name, module)

    return Trainer


tied = App()
tied.add_model("tied", lambda: TorchTrainingModel(TiedLM()), **IO)
tied.add_trainer("tied", _trainer("tied", TiedLM))

tied_bf16 = App()
tied_bf16.add_model(
    "tied",
    lambda: TorchTrainingModel(TiedLM().to(torch.float64)),  # floating tensors only
    served_dtype=torch.bfloat16,
    **IO,
)
tied_bf16.add_trainer("tied", _trainer("tied", TiedLM))

transposed = App()
transposed.add_model("transposed", lambda: TorchTrainingModel(Transposed()), **IO)
transposed.add_trainer("transposed", _trainer("transposed", Transposed))


class Complex128(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.zeros(8, 16, dtype=torch.complex128))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = (x.to(torch.complex128) @ self.c).real.float()
        return y


complex128 = App()
complex128.add_model("c128", lambda: TorchTrainingModel(Complex128()), **IO)
complex128.add_trainer("c128", _trainer("c128", Complex128))


class Counting(nn.Module):
    """Counts the rows it serves in a buffer (as a running normaliser updates its statistics
    while serving) and answers that count plus its weight; training leaves the count alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.register_buffer("seen", torch.zeros(1))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.seen += x.shape[0]
        y: torch.Tensor = (self.seen + self.w).expand(x.shape[0], 16)
        return y


counting = App()
counting.add_model("counting", lambda: TorchTrainingModel(Counting()), **IO)
counting.add_trainer("counting", _trainer("counting", Counting))

# The same with one more model, as a newer version of an app would have.
counting_and_transposed = App()
counting_and_transposed.add_model("counting", lambda: TorchTrainingModel(Counting()), **IO)
counting_and_transposed.add_trainer("counting", _trainer("counting", Counting))
counting_and_transposed.add_model("transposed", lambda: TorchTrainingModel(Transposed()), **IO)
counting_and_transposed.add_trainer("transposed", _trainer("transposed", Transposed))


def pretrained_tied() -> TorchTrainingModel[TiedLM]:
    """Served only, from the weights the file TEST_PRETRAINED holds."""
    return TorchTrainingModel(
        TiedLM(),
        inference_thread_only=True,
        pretrained_parameter_file=os.environ["TEST_PRETRAINED"],
    )


def broken() -> TorchTrainingModel[TiedLM]:
    raise RuntimeError("the tokenizer files are missing")


frozen = App()
frozen.add_model("frozen", pretrained_tied, **IO)

factory_raises = App()
factory_raises.add_model("broken", broken, **IO)
