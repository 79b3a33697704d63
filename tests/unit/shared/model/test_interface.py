"""PAMIQ-Core's model interface behaviours (pamiq_core.md §5.1)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.model import InferenceModel, TrainingModel
from shared.state import PersistentStateMixin


class InferenceModelImpl(InferenceModel):
    def __init__(self) -> None:
        self.param = 0.0

    def infer(self, x: float) -> float:
        return x * self.param


class TrainingModelImpl(TrainingModel[InferenceModelImpl]):
    def __init__(self, has_inference_model: bool = True, inference_thread_only: bool = False):
        super().__init__(has_inference_model, inference_thread_only)
        self.param = 1.0
        self.synced = 0

    def _create_inference_model(self) -> InferenceModelImpl:
        return InferenceModelImpl()

    def forward(self, x: float) -> float:
        return x + self.param

    def sync_impl(self, inference_model: InferenceModelImpl) -> None:
        self.synced += 1
        inference_model.param = self.param


def test_abstract_methods() -> None:
    assert InferenceModel.__abstractmethods__ == frozenset({"infer"})
    assert TrainingModel.__abstractmethods__ == frozenset(
        {"_create_inference_model", "forward", "sync_impl"}
    )
    assert issubclass(TrainingModel, PersistentStateMixin)


def test_call_forwards() -> None:
    inference = InferenceModelImpl()
    inference.param = 2.0
    assert inference(3.0) == inference.infer(3.0) == 6.0
    assert TrainingModelImpl()(1.0) == TrainingModelImpl().forward(1.0) == 2.0


def test_inference_only_without_inference_model_is_refused() -> None:
    with pytest.raises(ValueError, match="inference_thread_only=True needs"):
        TrainingModelImpl(has_inference_model=False, inference_thread_only=True)


@pytest.mark.parametrize("flags", [(True, False), (True, True)])
def test_inference_model_is_created_lazily_once(flags: tuple[bool, bool]) -> None:
    model = TrainingModelImpl(*flags)
    assert model._inference_model is None
    created = model.inference_model
    assert isinstance(created, InferenceModelImpl)
    assert model.inference_model is created


def test_no_inference_model_raises() -> None:
    with pytest.raises(RuntimeError, match="has no inference model"):
        TrainingModelImpl(has_inference_model=False).inference_model  # noqa: B018


def test_sync_copies_into_the_same_inference_object() -> None:
    model = TrainingModelImpl()
    inference = model.inference_model
    model.param = 5.0
    assert inference.param != model.param
    model.sync()
    assert model.inference_model is inference
    assert inference.param == 5.0


@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_sync_is_a_no_op_without_a_copy_to_sync(flags: tuple[bool, bool]) -> None:
    model = TrainingModelImpl(*flags)
    model.sync()
    assert model.synced == 0


def test_attach_inference_model_replaces_the_default_without_creating_it() -> None:
    model = TrainingModelImpl()
    stand_in = InferenceModelImpl()
    model.attach_inference_model(stand_in)
    assert model.inference_model is stand_in
    model.param = 3.0
    model.sync()
    assert stand_in.param == 3.0
    with pytest.raises(RuntimeError, match="cannot take an inference model"):
        TrainingModelImpl(has_inference_model=False).attach_inference_model(stand_in)


def test_persistence_is_a_no_op_by_default(tmp_path: Any) -> None:
    model = TrainingModelImpl()
    model.save_state(tmp_path / "x")
    model.load_state(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
