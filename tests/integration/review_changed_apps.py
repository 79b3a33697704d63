"""Variants of experience_apps' `steps` whose buffer `steps` declares other tensors than it did,
for a trainer restarted from a checkpoint the app's earlier version wrote."""

from __future__ import annotations

from torch import nn

from shared import App, DictSequentialBuffer, TensorSpec, TorchTrainingModel
from tests.integration.experience_apps import CAPACITY, FitTrainer


def steps_with(x: TensorSpec) -> App:
    app = App()
    app.add_model("line", lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
    tensors = [x, TensorSpec("y", "FP32", (1,)), TensorSpec("id", "INT64", ())]
    app.add_buffer(
        "steps", lambda: DictSequentialBuffer(["x", "y", "id"], CAPACITY), tensors=tensors
    )
    app.add_trainer("fit", FitTrainer)
    return app


wider = steps_with(TensorSpec("x", "FP32", (2,)))  # x was FP32 [1]
wider_any = steps_with(TensorSpec("x", "FP32", (-1,)))  # any length: [1] still fits
doubled = steps_with(TensorSpec("x", "FP64", (1,)))  # x was FP32


def steps_named(names: list[str]) -> App:
    app = App()
    app.add_model("line", lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
    specs = {
        "x": TensorSpec("x", "FP32", (1,)),
        "y": TensorSpec("y", "FP32", (1,)),
        "id": TensorSpec("id", "INT64", ()),
        "reward": TensorSpec("reward", "FP32", ()),
    }
    app.add_buffer(
        "steps",
        lambda: DictSequentialBuffer(names, CAPACITY),
        tensors=[specs[n] for n in names],
    )
    app.add_trainer("fit", FitTrainer)
    return app


renamed = steps_named(["x", "y", "reward"])  # id became reward
added = steps_named(["x", "y", "id", "reward"])  # reward added
