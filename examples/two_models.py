"""Two models, each with a trainer of its own: the example docker-compose.yml deploys.

`sine` learns y = sin(3x) and `cosine` learns y = cos(3x). One inference service (or several
replicas of it) serves both; each model is written by its own trainer process, which runs only
the trainer named in TRAINER_TRAINERS, so the two train side by side and scale apart:

    inference-service --models examples.two_models:app
    trainer-service --models examples.two_models:app --trainers sine --state-dir state/sine
    trainer-service --models examples.two_models:app --trainers cosine --state-dir state/cosine \
        --metrics-listen 127.0.0.1:9103

(on one host the second trainer needs a metrics port of its own: 9102 is the first's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from typing_extensions import override

from examples.quickstart import QuickstartTrainer, SineNet
from shared import App, TensorSpec, TorchTrainingModel

CURVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sine": lambda x: torch.sin(3 * x),
    "cosine": lambda x: torch.cos(3 * x),
}

app = App()


class CurveTrainer(QuickstartTrainer):
    """The quickstart's trainer, on the model named after one of CURVES, learning that curve."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name

    @override
    def curve(self, x: torch.Tensor) -> torch.Tensor:
        return CURVES[self.model_name](x)


def _build() -> TorchTrainingModel[SineNet]:
    return TorchTrainingModel(SineNet())


for _name in CURVES:
    app.add_model(
        _name,
        _build,
        inputs=[TensorSpec("x", "FP32", (-1, 1))],
        outputs=[TensorSpec("y", "FP32", (-1, 1))],
    )
    app.add_trainer(_name, functools.partial(CurveTrainer, _name))
