"""What trainer groups may not share, checked at start (trainer_service/groups.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from torch import nn
from typing_extensions import override

from shared import App, TorchTrainingModel
from shared.errors import ConfigurationError
from shared.model import TrainingModelsDict
from shared.statedir import claim_first
from shared.trainer.base import Trainer
from trainer_service.groups import check_groups, group_dirs, member_locks


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


def test_a_group_naming_a_trainer_the_app_lacks_is_refused(tmp_path: Path) -> None:
    app, _ = app_and_models()
    with pytest.raises(ConfigurationError, match=r"names trainer\(s\) d that the app does not"):
        group_dirs(app, [["a", "b"], ["c", "d"]], tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before anything is made


def test_groups_are_refused_where_they_would_share_a_trainer_or_a_directory(
    tmp_path: Path,
) -> None:
    app, _ = app_and_models()
    app.add_trainer("a+b", lambda: Uses("y"))
    assert group_dirs(app, [["a", "b"], ["c"]], tmp_path) == [tmp_path / "a+b", tmp_path / "c"]
    with pytest.raises(ConfigurationError, match="trainer 'a' twice in the group a,a"):
        group_dirs(app, [["a", "a"]], tmp_path)
    with pytest.raises(ConfigurationError, match="trainer 'c' in the groups c and c"):
        group_dirs(app, [["c"], ["c"]], tmp_path)
    with pytest.raises(
        ConfigurationError, match="the groups a,b and a\\+b would keep state in one"
    ):
        group_dirs(app, [["a", "b"], ["a+b"]], tmp_path)
    long = ["t" * 200, "u" * 200]
    for name in long:
        app.add_trainer(name, lambda: Uses("y"))
    with pytest.raises(ConfigurationError, match="401 bytes, past the 255"):
        group_dirs(app, [long], tmp_path)


def test_replicas_with_overlapping_layouts_never_run_one_trainer_twice(tmp_path: Path) -> None:
    """One replica runs the groups 'a;b' (it claims 'a'), another 'a,b' (a rolling change of
    the layout on the same volume): the second stands by while the first holds trainer a."""
    app, _ = app_and_models()
    stop = threading.Event()
    old = [["a"], ["b"]]
    first = claim_first(
        group_dirs(app, old, tmp_path), wait=stop, members=member_locks(old, tmp_path)
    )
    assert first is not None and first[0] == 0
    new = [["a", "b"]]
    result: list[object] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            claim_first(
                group_dirs(app, new, tmp_path), wait=stop, members=member_locks(new, tmp_path)
            )
        )
    )
    waiter.start()
    time.sleep(1.5)
    assert result == []  # standing by: trainer a is held
    first[1].release()
    waiter.join(10)
    assert result and result[0] is not None
    stop.set()
