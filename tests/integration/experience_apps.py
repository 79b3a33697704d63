"""Apps with experience buffers that the experience-plane tests start trainers with.

`steps`: one buffer of (x, y, id) samples that nothing evicts (the tests check which samples
arrived) and a trainer that fits y = w x on them only once enough new samples arrived. Its
model has no inference copy, so a trainer runs without any inference service.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from typing_extensions import override

from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup
from tests.integration.apps import Words

STEPS_TENSORS = [
    TensorSpec("x", "FP32", (1,)),
    TensorSpec("y", "FP32", (1,)),
    TensorSpec("id", "INT64", ()),
]
CAPACITY = 100_000


class FitTrainer(TorchTrainer):
    """A few SGD steps on every sample in the buffer, once 20 new ones arrived."""

    def __init__(self) -> None:
        super().__init__("steps", min_buffer_size=20, min_new_data_count=20)

    @override
    def on_training_models_attached(self) -> None:
        self.line = self.get_torch_training_model("line", nn.Linear)

    @override
    def on_data_users_attached(self) -> None:
        self.steps = self.get_data_user("steps")

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.line.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        data = self.steps.get_data()
        x, y = torch.stack(data["x"]), torch.stack(data["y"])
        for _ in range(3):
            loss = nn.functional.mse_loss(self.line(x), y)
            self.optimizers["sgd"].zero_grad()
            loss.backward()
            self.optimizers["sgd"].step()


steps = App()
steps.add_model("line", lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
steps.add_buffer(
    "steps", lambda: DictSequentialBuffer(["x", "y", "id"], CAPACITY), tensors=STEPS_TENSORS
)
steps.add_trainer("fit", FitTrainer)

# `served_steps`: the same, its model served (each run ends in a push, which a writer that took
# the model over fences).
served_steps = App()
served_steps.add_model(
    "line",
    lambda: TorchTrainingModel(nn.Linear(1, 1)),
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
)
served_steps.add_buffer(
    "steps", lambda: DictSequentialBuffer(["x", "y", "id"], CAPACITY), tensors=STEPS_TENSORS
)
served_steps.add_trainer("fit", FitTrainer)


# `recorded`: a served model whose requests the inference service records into the buffer
# `served` (declared) or, when a request asks, `asked`; `elsewhere` holds a tensor the model
# neither takes nor returns. Nothing evicts, and the trainer never trains: the tests read what
# arrived.
ROW = TensorSpec("x", "FP32", (1,))


class HoldsTrainer(TorchTrainer):
    """Reads the buffers (so its process holds them) and never trains."""

    def __init__(self) -> None:
        super().__init__("served", min_buffer_size=CAPACITY + 1)

    @override
    def on_training_models_attached(self) -> None:
        self.scale = self.get_torch_training_model("scale", nn.Linear)

    @override
    def on_data_users_attached(self) -> None:
        self.users = [self.get_data_user(n) for n in ("served", "asked", "elsewhere")]

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.scale.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        raise AssertionError("never trainable")


recorded = App()
recorded.add_model(
    "scale",
    lambda: TorchTrainingModel(nn.Linear(1, 1)),
    inputs=[TensorSpec("x", "FP32", (-1, 1))],
    outputs=[TensorSpec("y", "FP32", (-1, 1))],
    record="served",
)
recorded.add_buffer(
    "served",
    lambda: DictSequentialBuffer(["x", "y"], CAPACITY),
    tensors=[ROW, TensorSpec("y", "FP32", (1,))],
)
recorded.add_buffer("asked", lambda: DictSequentialBuffer(["x"], CAPACITY), tensors=[ROW])
recorded.add_buffer(
    "elsewhere",
    lambda: DictSequentialBuffer(["z"], CAPACITY),
    tensors=[TensorSpec("z", "FP32", (1,))],
)
recorded.add_trainer("holds", HoldsTrainer)


# `grouped`: two trainers, `left` and `right`, each fitting a model of its own on a buffer of
# its own, for trainer groups: a process running one group holds that group's buffer only.
class SideTrainer(FitTrainer):
    """FitTrainer on the buffer `side`, training the model `side`."""

    def __init__(self, side: str) -> None:
        TorchTrainer.__init__(self, side, min_buffer_size=20, min_new_data_count=20)
        self.side = side

    @override
    def on_training_models_attached(self) -> None:
        self.line = self.get_torch_training_model(self.side, nn.Linear)

    @override
    def on_data_users_attached(self) -> None:
        self.steps = self.get_data_user(self.side)


def side_trainer(side: str) -> Callable[[], SideTrainer]:
    return lambda: SideTrainer(side)


grouped = App()
for side in ("left", "right"):
    grouped.add_model(side, lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
    grouped.add_buffer(
        side, lambda: DictSequentialBuffer(["x", "y", "id"], CAPACITY), tensors=STEPS_TENSORS
    )
    grouped.add_trainer(side, side_trainer(side))


# `spoken`: the BYTES model `words` (tests/integration/apps.py: text in, each string upper-cased
# and its length out), its first input BYTES, recording each row's length into `lengths`.
class LengthsTrainer(TorchTrainer):
    """Reads `lengths` (so its process holds it) and never trains."""

    def __init__(self) -> None:
        super().__init__("lengths", min_buffer_size=CAPACITY + 1)

    @override
    def on_training_models_attached(self) -> None:
        self.words = self.get_torch_training_model("words", Words)

    @override
    def on_data_users_attached(self) -> None:
        self.lengths = self.get_data_user("lengths")

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.words.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        raise AssertionError("never trainable")


spoken = App()
spoken.add_model(
    "words",
    lambda: TorchTrainingModel(Words()),
    inputs=[TensorSpec("text", "BYTES", (-1,))],
    outputs=[TensorSpec("upper", "BYTES", (-1,)), TensorSpec("length", "FP32", (-1,))],
    record="lengths",
)
spoken.add_buffer(
    "lengths",
    lambda: DictSequentialBuffer(["length"], CAPACITY),
    tensors=[TensorSpec("length", "FP32", ())],
)
spoken.add_trainer("lengths", LengthsTrainer)
