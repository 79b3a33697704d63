"""What trainer groups may not share, checked at start (trainer_service/groups.py)."""

from __future__ import annotations

import pytest
from torch import nn
from typing_extensions import override

from shared import App, TorchTrainingModel
from shared.errors import ConfigurationError
from shared.model import TrainingModelsDict
from shared.trainer.base import Trainer
from trainer_service.groups import check_groups


class Uses(Trainer):
    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model

    @override
    def on_training_models_attached(self) -> None:
        self.get_training_model(self.model)

    @override
    def train(self) -> None:
        pass


def app_and_models() -> tuple[App, TrainingModelsDict]:
    app = App()
    for name in ("x", "y"):
        app.add_model(name, lambda: TorchTrainingModel(nn.Linear(1, 1), has_inference_model=False))
    app.add_trainer("a", lambda: Uses("x"))
    app.add_trainer("b", lambda: Uses("x"))
    app.add_trainer("c", lambda: Uses("y"))
    models = TrainingModelsDict({n: s.build() for n, s in app.models.items()})
    return app, models


def test_groups_that_share_a_model_are_refused_naming_it() -> None:
    app, models = app_and_models()
    check_groups(app, [["a", "b"], ["c"]], models)  # x in one group only
    with pytest.raises(ConfigurationError, match="model 'x' is used by the groups a and b"):
        check_groups(app, [["a"], ["b", "c"]], models)


def test_a_group_naming_a_trainer_the_app_lacks_is_refused() -> None:
    app, models = app_and_models()
    with pytest.raises(ConfigurationError, match=r"names trainer\(s\) d that the app does not"):
        check_groups(app, [["a", "b"], ["c", "d"]], models)
