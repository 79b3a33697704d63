"""PAMIQ-Core's model containers (pamiq_core.md §5.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.model import InferenceModelsDict, TrainingModelsDict
from tests.unit.shared.model.test_interface import TrainingModelImpl


class Recording(TrainingModelImpl):
    def __init__(self, *flags: bool) -> None:
        super().__init__(*flags)
        self.calls: list[tuple[str, Path]] = []

    def save_state(self, path: Path) -> None:
        self.calls.append(("save", path))

    def load_state(self, path: Path) -> None:
        self.calls.append(("load", path))


@pytest.fixture
def models() -> dict[str, Recording]:
    return {
        "model": Recording(True, False),
        "inference_only": Recording(True, True),
        "no_inference": Recording(False, False),
    }


def test_inference_models_are_published_under_the_same_names(models: dict[str, Recording]) -> None:
    d = TrainingModelsDict(models)
    assert isinstance(d.inference_models_dict, InferenceModelsDict)
    assert d.inference_models_dict is d.inference_models_dict
    assert d.inference_models_dict.keys() == {"model", "inference_only"}
    assert d.inference_models_dict["model"] is models["model"].inference_model
    assert d.inference_models_dict["inference_only"] is models["inference_only"].inference_model


def test_inference_only_models_cannot_be_fetched(models: dict[str, Recording]) -> None:
    d = TrainingModelsDict(models)
    assert d["model"] is models["model"]
    assert d["no_inference"] is models["no_inference"]
    with pytest.raises(KeyError, match=r"model 'inference_only' is inference thread only\."):
        d["inference_only"]
    assert "inference_only" in d


def test_save_state_creates_the_directory_and_saves_every_model(
    models: dict[str, Recording], tmp_path: Path
) -> None:
    TrainingModelsDict(models).save_state(tmp_path / "models")
    assert (tmp_path / "models").is_dir()
    for name, model in models.items():
        assert model.calls == [("save", tmp_path / "models" / name)]


def test_load_state_loads_then_syncs_every_model(
    models: dict[str, Recording], tmp_path: Path
) -> None:
    TrainingModelsDict(models).load_state(tmp_path)
    for name, model in models.items():
        assert model.calls == [("load", tmp_path / name)]
    assert models["model"].synced == 1  # the others have nothing to sync
    assert models["inference_only"].synced == 0
