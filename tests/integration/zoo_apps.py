"""A model zoo as an ML engineer serves it (test_review_zoo.py): dozens of small models trained
by several trainers, a model of thousands of tensors with long, dotted and unicode names,
BatchNorm (int64 num_batches_tracked), non-persistent buffers, tied embeddings, 0-d and
zero-element tensors, an inference-only model and a training-only one.

Both services import this module (`tests.integration.zoo_apps:<app>`). Environment:
ZOO_MODELS (how many small models, default 32), ZOO_DEEP (tensors of `deep`, default 2000),
ZOO_NAME_LEN (length of deep's tensor names, default 120), ZOO_PRETRAINED (the file of
`frozen`), ZOO_SHIFT_ON_INFERENCE (a model name: a process started with it builds that one with
another tensor, as a service running another version of the app would).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from typing_extensions import override

from shared import App, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup

INPUTS = [TensorSpec("x", "FP32", (-1, 8))]
OUTPUTS = [TensorSpec("y", "FP32", (-1, 8))]
SMALL = int(os.environ.get("ZOO_MODELS", "32"))
DEEP = int(os.environ.get("ZOO_DEEP", "2000"))
NAME_LEN = int(os.environ.get("ZOO_NAME_LEN", "120"))
DEEP_ELEMENTS = 512  # fp32 elements per tensor of `deep`: 2,000 tensors make 4 MB


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)  # running stats, int64 num_batches_tracked
        self.register_buffer("rope", torch.linspace(0, 1, width), persistent=False)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.bn(self.fc(self.ln(x))) + self.rope
        return out


class Small(nn.Module):
    """A tiny transformer-like stack: tied embedding and head, blocks, a 0-d temperature,
    a zero-element buffer."""

    def __init__(self, seed: int, width: int = 8, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, width, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.temperature = nn.Parameter(torch.tensor(1.0 + seed / 100))
        self.empty: torch.Tensor
        self.register_buffer("empty", torch.zeros(0, width))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.emb.weight.mean(0) + self.empty.sum()
        for block in self.blocks:
            assert isinstance(block, Block)
            h = block(h)
        y: torch.Tensor = self.head(h) * self.temperature
        return y


class Shifted(Small):
    """What an older version of the app builds for one model: another width of its head."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.extra = nn.Parameter(torch.zeros(3))


class Deep(nn.Module):
    """Thousands of tensors (`DEEP`), grouped as layers of modules whose names are long, hold
    dots (module nesting) and unicode; the forward reads every one."""

    def __init__(
        self, count: int = DEEP, elements: int = DEEP_ELEMENTS, name_len: int = NAME_LEN
    ) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.layers = nn.ModuleList()
        per_layer = 10
        suffix = "ü名" + "x" * max(0, name_len - 20)
        for i in range(0, count, per_layer):
            layer = nn.Module()
            for j in range(min(per_layer, count - i)):
                layer.register_parameter(
                    f"w{j}_{suffix}", nn.Parameter(torch.randn(elements) * 0.01)
                )
            self.layers.append(layer)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.stack([p.sum() for p in self.parameters()]).sum()
        return x + total


class Wide(nn.Module):
    """The same bytes as `Deep` in four tensors."""

    def __init__(self, count: int = DEEP) -> None:
        super().__init__()
        torch.manual_seed(7)
        each = count * DEEP_ELEMENTS // 4
        self.a = nn.Parameter(torch.randn(each) * 0.01)
        self.b = nn.Parameter(torch.randn(each) * 0.01)
        self.c = nn.Parameter(torch.randn(each) * 0.01)
        self.d = nn.Parameter(torch.randn(each) * 0.01)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.a.sum() + self.b.sum() + self.c.sum() + self.d.sum())


def small_name(i: int) -> str:
    return f"m{i:02d}"


UNICODE_MODEL = "ünï.cødé-模型.v2"


class ZooTrainer(TorchTrainer):
    """A few SGD steps per run on each of its models, whose BatchNorm stats move too."""

    names: tuple[str, ...] = ()

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.modules = {n: self.get_torch_training_model(n).model for n in self.names}

    @override
    def create_optimizers(self) -> OptimizersSetup:
        params = [p for m in self.modules.values() for p in m.parameters()]
        return {"sgd": torch.optim.SGD(params, lr=0.05)}

    @override
    def train(self) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(16, 8, generator=g)
        for module in self.modules.values():
            module.train()
            loss = module(x).pow(2).mean()
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()


class NoiseTrainer(TorchTrainer):
    """Moves every tensor of its model each run (no gradient: a whole-state change)."""

    name = ""

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.module = self.get_torch_training_model(self.name).model

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {}

    @override
    def train(self) -> None:
        with torch.no_grad():
            for p in self.module.parameters():
                p.add_(0.001)


def _zoo_trainer(names: list[str]) -> type[ZooTrainer]:
    return type("Trainer", (ZooTrainer,), {"names": tuple(names)})


def _noise_trainer(name: str) -> type[NoiseTrainer]:
    return type("Noise", (NoiseTrainer,), {"name": name})


def _small(i: int) -> Callable[[], TorchTrainingModel[Small]]:
    name = small_name(i)

    def build() -> TorchTrainingModel[Small]:
        if os.environ.get("ZOO_SHIFT_ON_INFERENCE") == name:
            return TorchTrainingModel(Shifted(i))
        return TorchTrainingModel(Small(i))

    return build


def frozen() -> TorchTrainingModel[Small]:
    return TorchTrainingModel(
        Small(99),
        inference_thread_only=True,
        pretrained_parameter_file=os.environ["ZOO_PRETRAINED"],
    )


def _zoo(small: int, deep: bool) -> App:
    app = App()
    names = [small_name(i) for i in range(small)]
    for i in range(small):
        app.add_model(names[i], _small(i), inputs=INPUTS, outputs=OUTPUTS)
    app.add_model(
        UNICODE_MODEL, lambda: TorchTrainingModel(Small(50)), inputs=INPUTS, outputs=OUTPUTS
    )
    app.add_model("scratch", lambda: TorchTrainingModel(Small(51), has_inference_model=False))
    if "ZOO_PRETRAINED" in os.environ:
        app.add_model("frozen", frozen, inputs=INPUTS, outputs=OUTPUTS)
    # Four trainers share the small models; the unicode-named one has its own.
    for t in range(4):
        app.add_trainer(f"t{t}", _zoo_trainer(names[t::4]))
    app.add_trainer("unicode", _zoo_trainer([UNICODE_MODEL, "scratch"]))
    if deep:
        app.add_model("deep", lambda: TorchTrainingModel(Deep()), inputs=INPUTS, outputs=OUTPUTS)
        app.add_trainer("deep", _noise_trainer("deep"))
    return app


zoo = _zoo(SMALL, deep=True)
small_zoo = _zoo(SMALL, deep=False)

# Two models of the same bytes: thousands of tensors against four (push cost per tensor).
shapes = App()
shapes.add_model("deep", lambda: TorchTrainingModel(Deep()), inputs=INPUTS, outputs=OUTPUTS)
shapes.add_model("wide", lambda: TorchTrainingModel(Wide()), inputs=INPUTS, outputs=OUTPUTS)
shapes.add_trainer("deep", _noise_trainer("deep"))
shapes.add_trainer("wide", _noise_trainer("wide"))

# Several models of thousands of tensors with long names (a few bytes each): what the sync
# plane's lookups (GetModel, ListModels) answer grows with tensors times name lengths.
LONG_MODELS = int(os.environ.get("ZOO_LONG_MODELS", "4"))
LONG_TENSORS = int(os.environ.get("ZOO_LONG_TENSORS", "5000"))
LONG_NAME = int(os.environ.get("ZOO_LONG_NAME", "1000"))
long_names = App()
for _i in range(LONG_MODELS):
    long_names.add_model(
        f"long{_i}",
        lambda: TorchTrainingModel(Deep(LONG_TENSORS, 1, LONG_NAME)),
        inputs=INPUTS,
        outputs=OUTPUTS,
    )
    long_names.add_trainer(f"long{_i}", _noise_trainer(f"long{_i}"))

# A model whose name is long (ZOO_MODEL_NAME_LEN characters, default 240): names that
# users derive from their model cards and hyperparameters; and model names that are path
# components of their own ('.' and '..'). Both name files in the state directories, so App
# refuses them as they are declared: built on lookup (`zoo_apps:long_model_name`), so that
# the rest of this module imports.
LONG_MODEL_NAME = "zoo." + "é" * (int(os.environ.get("ZOO_MODEL_NAME_LEN", "240")) - 4)


def __getattr__(name: str) -> App:
    if name not in ("long_model_name", "dot_names"):
        raise AttributeError(name)
    app = App()
    names = [LONG_MODEL_NAME] if name == "long_model_name" else [".", ".."]
    for model in names:
        app.add_model(model, lambda: TorchTrainingModel(Small(3)), inputs=INPUTS, outputs=OUTPUTS)
    app.add_trainer(name, _zoo_trainer(names))
    return app
