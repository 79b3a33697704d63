"""PAMIQ-Core's model containers (pamiq_core.md §5.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model import InferenceModelsDict, TrainingModelsDict
from tests.unit.shared.model.test_interface import InferenceModelImpl, TrainingModelImpl


class Recording(TrainingModelImpl):
    """Records save_state, load_state and sync calls, in order."""

    def __init__(self, has_inference_model: bool, inference_thread_only: bool) -> None:
        super().__init__(has_inference_model, inference_thread_only)
        self.calls: list[tuple[str, Path | None]] = []

    def save_state(self, path: Path) -> None:
        self.calls.append(("save", path))

    def load_state(self, path: Path) -> None:
        self.calls.append(("load", path))

    def sync(self) -> None:
        self.calls.append(("sync", None))
        super().sync()


@pytest.fixture
def models() -> dict[str, Recording]:
    return {
        "model": Recording(True, False),
        "inference_only": Recording(True, True),
        "no_inference": Recording(False, False),
    }


def test_inference_models_are_published_under_the_same_names(models: dict[str, Recording]) -> None:
    d = TrainingModelsDict(models)
    inference = d.inference_models_dict
    assert type(inference) is InferenceModelsDict
    assert d.inference_models_dict is inference
    assert list(inference) == ["model", "inference_only"]
    assert inference["model"] is models["model"].inference_model
    assert inference["inference_only"] is models["inference_only"].inference_model
    assert "no_inference" not in inference


def test_registration_creates_the_inference_copy_once(models: dict[str, Recording]) -> None:
    d = TrainingModelsDict()
    d["model"] = models["model"]
    assert models["model"].created == 1
    assert d.inference_models_dict["model"] is models["model"].inference_model
    assert models["model"].created == 1


def test_registration_publishes_an_attached_copy_without_creating_one() -> None:
    model = TrainingModelImpl()
    stand_in = InferenceModelImpl()
    model.attach_inference_model(stand_in)
    d = TrainingModelsDict({"m": model})
    assert d.inference_models_dict["m"] is stand_in
    assert model.created == 0


def test_getitem_returns_the_models_except_inference_only_ones(
    models: dict[str, Recording],
) -> None:
    d = TrainingModelsDict(models)
    assert d["model"] is models["model"]
    assert d["no_inference"] is models["no_inference"]
    with pytest.raises(KeyError, match=r"^\"model 'inference_only' is inference thread only\.\"$"):
        d["inference_only"]
    assert "inference_only" in d
    with pytest.raises(KeyError, match=r"^'missing'$"):
        d["missing"]


def test_save_state_creates_the_directory_and_saves_every_model(
    models: dict[str, Recording], tmp_path: Path
) -> None:
    TrainingModelsDict(models).save_state(tmp_path / "models")
    assert (tmp_path / "models").is_dir()
    for name, model in models.items():
        assert model.calls == [("save", tmp_path / "models" / name)]


def test_save_state_refuses_an_existing_directory(
    models: dict[str, Recording], tmp_path: Path
) -> None:
    with pytest.raises(FileExistsError):
        TrainingModelsDict(models).save_state(tmp_path)


def test_load_state_loads_then_syncs_every_model(
    models: dict[str, Recording], tmp_path: Path
) -> None:
    TrainingModelsDict(models).load_state(tmp_path)
    for name, model in models.items():
        assert model.calls == [("load", tmp_path / name), ("sync", None)]
    assert models["model"].synced == [models["model"].inference_model]
    assert models["inference_only"].synced == []  # sync() is a no-op for it
    assert models["no_inference"].synced == []
