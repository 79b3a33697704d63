"""The trainer's syncs around its runs (trainer_service/remote.py `Syncs`), through a
TrainingLoop whose publisher records what it is given: nothing is sent before the loop starts;
a sync that fails inside a run is kept until the run has torn down; a fenced writer is raised
at once; a model whose class's own sync_impl sends nothing is named in a warning."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
from typing_extensions import override

from shared import App, TorchTrainer, TorchTrainingModel
from shared.torch.trainer import OptimizersSetup
from trainer_service.runner import TrainingLoop
from trainer_service.sync_errors import SyncFailedError, WriterFencedError


class Recording:
    """Stands for the Publisher: records each model's sends; raises `error` when set."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.error: SyncFailedError | None = None

    def publish(self, name: str, state: Mapping[str, torch.Tensor], owned: Any = ()) -> None:
        self.sent.append(name)
        if self.error is not None:
            raise self.error

    def version(self, name: str) -> int:
        return len(self.sent)


class Quiet(TorchTrainingModel[nn.Module]):
    """A PAMIQ-style sync_impl of its own, which copies nothing anywhere."""

    @override
    def sync_impl(self, inference_model: Any) -> None:
        pass


class Stepper(TorchTrainer):
    """One SGD step a run, with a sync() half-way through train(); syncs as soon as it has
    its model too."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model_name = model
        self.finished = 0
        self.torn_down = 0

    @override
    def on_training_models_attached(self) -> None:
        super().on_training_models_attached()
        self.net = self.get_torch_training_model(self.model_name, nn.Linear)
        self.net.sync()  # before the loop has resumed: sends nothing

    @override
    def create_optimizers(self) -> OptimizersSetup:
        return {"sgd": torch.optim.SGD(self.net.model.parameters(), lr=0.1)}

    @override
    def train(self) -> None:
        self.net.model(torch.ones(1, 2)).sum().backward()
        self.net.sync()
        self.optimizers["sgd"].step()
        self.finished += 1

    @override
    def teardown(self) -> None:
        super().teardown()
        self.torn_down += 1


def loop_of(model: type[TorchTrainingModel[nn.Module]]) -> tuple[TrainingLoop, Recording]:
    app = App()
    app.add_model("net", lambda: model(nn.Linear(2, 1)))
    app.add_trainer("stepper", lambda: Stepper("net"))
    publisher = Recording()
    return TrainingLoop(app, publisher, torch.device("cpu")), publisher  # type: ignore[arg-type]


def test_nothing_is_sent_before_start_and_a_failed_sync_in_train_lets_the_run_finish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop, publisher = loop_of(TorchTrainingModel)
    assert publisher.sent == []  # the sync in on_training_models_attached sent nothing
    stop = threading.Event()
    loop.start(stop)
    assert publisher.sent == ["net"]
    publisher.error = SyncFailedError("no inference service could be reached")
    with caplog.at_level(logging.ERROR):
        loop.run(stop, max_runs=1)
    (stepper,) = loop.trainers.values()
    assert isinstance(stepper, Stepper)
    assert (stepper.finished, stepper.torn_down) == (1, 1)
    assert publisher.sent == ["net"] * 3  # the one in train(), the one after it
    assert "trainer stepper: sync failed, will catch up next run" in caplog.text
    assert stepper.optimizer_states["sgd"]  # kept by teardown


def test_a_fenced_writer_is_raised_out_of_the_run_at_once() -> None:
    loop, publisher = loop_of(TorchTrainingModel)
    stop = threading.Event()
    loop.start(stop)
    publisher.error = WriterFencedError("another trainer has taken 'net' over")
    with pytest.raises(WriterFencedError):
        loop.run(stop, max_runs=1)
    (stepper,) = loop.trainers.values()
    assert isinstance(stepper, Stepper)
    assert stepper.finished == 0


def test_a_model_whose_sync_impl_sends_nothing_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop, publisher = loop_of(Quiet)
    stop = threading.Event()
    with caplog.at_level(logging.WARNING):
        loop.start(stop)
        loop.run(stop, max_runs=2)
    assert publisher.sent == []
    warned = [r.getMessage() for r in caplog.records if "sent nothing" in r.getMessage()]
    assert warned == [
        "model net: its sync() sent nothing to the inference services: its class's sync_impl "
        "does not call TorchTrainingModel.sync_impl (super().sync_impl), which is what sends "
        "the weights across machines"
    ]
