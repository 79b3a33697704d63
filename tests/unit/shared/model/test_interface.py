"""PAMIQ-Core's model interface (pamiq_core.md §5.1), plus attach_inference_model."""

from __future__ import annotations

from pathlib import Path

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
        self.created = 0
        self.synced: list[InferenceModelImpl] = []

    def _create_inference_model(self) -> InferenceModelImpl:
        self.created += 1
        return InferenceModelImpl()

    def forward(self, x: float) -> float:
        return x + self.param

    def sync_impl(self, inference_model: InferenceModelImpl) -> None:
        self.synced.append(inference_model)
        inference_model.param = self.param


def test_inference_model_abstract_methods_and_call() -> None:
    assert InferenceModel.__abstractmethods__ == frozenset({"infer"})
    model = InferenceModelImpl()
    model.param = 2.0
    assert model(3.0) == model.infer(3.0) == 6.0


def test_training_model_abstract_methods_and_call() -> None:
    assert TrainingModel.__abstractmethods__ == frozenset(
        {"_create_inference_model", "forward", "sync_impl"}
    )
    assert issubclass(TrainingModel, PersistentStateMixin)
    model = TrainingModelImpl()
    assert model(1.5) == model.forward(1.5) == 2.5


@pytest.mark.parametrize("flags", [(True, False), (True, True), (False, False)])
def test_flags_are_kept(flags: tuple[bool, bool]) -> None:
    model = TrainingModelImpl(*flags)
    assert (model.has_inference_model, model.inference_thread_only) == flags


def test_inference_thread_only_needs_an_inference_model() -> None:
    with pytest.raises(
        ValueError, match=r"^inference_thread_only=True needs has_inference_model=True: "
    ):
        TrainingModelImpl(has_inference_model=False, inference_thread_only=True)


@pytest.mark.parametrize("flags", [(True, False), (True, True)])
def test_inference_model_is_created_lazily_and_once(flags: tuple[bool, bool]) -> None:
    model = TrainingModelImpl(*flags)
    assert model.created == 0
    created = model.inference_model
    assert type(created) is InferenceModelImpl
    assert model.inference_model is created
    assert model.created == 1


def test_no_inference_model_raises() -> None:
    model = TrainingModelImpl(has_inference_model=False)
    with pytest.raises(
        RuntimeError,
        match=r"^TrainingModelImpl was created with has_inference_model=False, so it has no "
        r"inference model; pass has_inference_model=True to get one$",
    ):
        model.inference_model  # noqa: B018
    assert model.created == 0


def test_sync_copies_into_the_same_inference_object() -> None:
    model = TrainingModelImpl()
    inference = model.inference_model
    model.param = 5.0
    assert inference.param != model.param
    model.sync()
    assert model.inference_model is inference
    assert inference.param == 5.0
    assert model.synced == [inference]


@pytest.mark.parametrize("flags", [(False, False), (True, True)])
def test_sync_is_a_no_op_without_a_separate_copy(flags: tuple[bool, bool]) -> None:
    model = TrainingModelImpl(*flags)
    model.sync()
    assert model.synced == []
    assert model.created == 0


def test_attach_inference_model_replaces_the_default_without_creating_it() -> None:
    model = TrainingModelImpl()
    stand_in = InferenceModelImpl()
    model.attach_inference_model(stand_in)
    assert model.inference_model is stand_in
    assert model.created == 0
    model.param = 3.0
    model.sync()
    assert model.synced == [stand_in]
    assert stand_in.param == 3.0


def test_attach_inference_model_replaces_a_created_copy() -> None:
    model = TrainingModelImpl()
    first = model.inference_model
    stand_in = InferenceModelImpl()
    model.attach_inference_model(stand_in)
    assert model.inference_model is stand_in
    assert stand_in is not first


def test_attach_inference_model_needs_an_inference_model() -> None:
    model = TrainingModelImpl(has_inference_model=False)
    with pytest.raises(
        RuntimeError,
        match=r"^TrainingModelImpl was created with has_inference_model=False, so it cannot "
        r"take an inference model; pass has_inference_model=True$",
    ):
        model.attach_inference_model(InferenceModelImpl())


def test_persistence_is_a_no_op_by_default(tmp_path: Path) -> None:
    model = TrainingModelImpl()
    model.save_state(tmp_path / "x")
    model.load_state(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
