"""A PAMIQ-Core user's port, checked against PAMIQ-Core 0.6.0's documented behaviour.

Each test cites the section of /work/shared/research/pamiq_core.md (the reference for PAMIQ's
exact behaviour) that states what a porting user relies on, and fails where the project does
otherwise without saying so in its docs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from shared.app import App
from shared.errors import ConfigurationError
from shared.model.remote import RemoteInferenceModel
from shared.torch.build import build_torch_model
from shared.torch.model import TorchTrainingModel
from shared.trainer.base import Trainer


class _Recorder(RemoteInferenceModel):
    """A remote inference copy that keeps what each sync published."""

    def __init__(self) -> None:
        self.published: list[dict[str, torch.Tensor]] = []

    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.published.append({k: v.clone() for k, v in weights.items()})


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.drop(self.fc(x)))
        return out


class _WithExtraState(nn.Module):
    """A module that keeps a counter through nn.Module's extra-state API (in `state_dict()`
    under `_extra_state`, the way torch documents it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.steps = 0

    def get_extra_state(self) -> Any:
        return {"steps": self.steps}

    def set_extra_state(self, state: Any) -> None:
        self.steps = state["steps"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def test_a_remote_sync_puts_the_training_module_back_in_train_mode() -> None:
    """§2.4 (how sync is done): `sync_impl` ends with `self.model.train()`; "After sync, ...
    the training module has `training == True`. sync always forces training mode back on."

    A PAMIQ trainer that evaluates at the end of `train()` (`model.eval()`, a validation pass)
    relies on that: the next run trains with dropout and batch-norm updates on again. On the
    trainer service every model's inference copy is remote (a RemoteInferenceModel), and that
    sync leaves the module in whatever mode `train()` left it, so every later run silently
    trains in eval mode (dropout off, batch-norm statistics frozen). README/docs do not say so.
    """
    model = TorchTrainingModel(_DropoutNet())
    remote = _Recorder()
    model.attach_inference_model(remote)

    model.model.eval()  # the end of a PAMIQ train(): a validation pass
    model.sync()

    assert len(remote.published) == 1  # the sync did happen
    assert model.model.training, (
        "after sync() the training module is still in eval mode; PAMIQ's sync always puts it "
        "back in train mode"
    )
    assert all(m.training for m in model.model.modules())


def test_a_model_with_extra_state_is_refused_cleanly_or_served() -> None:
    """§2.3 / §4: PAMIQ's TorchTrainingModel saves and loads `self.model.state_dict()`, which
    holds `_extra_state` for modules that use torch's extra-state API; such a model works in
    PAMIQ. docs/sync.md (Dtypes): a model that cannot travel is "refused at start by both
    services: exit status 2 and a line naming the model and the tensor" (ConfigurationError).

    `build_torch_model` (what both services call on each factory) instead raises a bare
    AttributeError ('dict' object has no attribute 'dtype') from its dtype check: a stack
    trace at start, naming neither the model nor `_extra_state`.
    """
    try:
        build_torch_model("counter", lambda: TorchTrainingModel(_WithExtraState()))
    except ConfigurationError as exc:
        assert "counter" in str(exc) and "_extra_state" in str(exc)
    except AttributeError as exc:
        pytest.fail(f"build_torch_model crashed instead of refusing the model: {exc!r}")


def test_save_state_of_a_module_with_extra_state(tmp_path: Path) -> None:
    """§2.3 (`save_state` / `load_state`) and §4 (state layout): PAMIQ writes
    `self.model.state_dict()` and loads it back, `_extra_state` included. A training-only
    model (`has_inference_model=False`) passes `build_torch_model`'s check, so the trainer
    service checkpoints it; here `save_state` dies with AttributeError ('dict' object has no
    attribute 'detach'), which is not the StateWriteError the training loop catches. Expected:
    the extra state round-trips (it is a JSON-able dict, no pickle needed), or at least a
    clear error naming `_extra_state`.
    """
    module = _WithExtraState()
    module.steps = 7
    model = TorchTrainingModel(module, has_inference_model=False)
    try:
        model.save_state(tmp_path / "counter")
    except AttributeError as exc:
        pytest.fail(f"save_state crashed on a module with extra state: {exc!r}")
    except (TypeError, ValueError) as exc:
        assert "_extra_state" in str(exc)
        return
    fresh = TorchTrainingModel(_WithExtraState(), has_inference_model=False)
    fresh.load_state(tmp_path / "counter")
    assert fresh.model.steps == 7


class _NoPublisher:
    """Stands for the trainer's Publisher; these tests never sync."""


def _loop(app: App, device: torch.device) -> Any:
    from trainer_service.runner import TrainingLoop

    return TrainingLoop(app, _NoPublisher(), device)  # type: ignore[arg-type]


def test_looking_up_an_inference_only_model_says_so_in_the_trainer_service() -> None:
    """§1.3 / §1.4: `TrainingModelsDict.__getitem__` raises
    `KeyError("model '<name>' is inference thread only.")`, and `Trainer.get_training_model`
    goes through it; the project's own TrainingModelsDict does the same.

    The trainer service leaves inference-only models out of its TrainingModelsDict, so a
    ported trainer that (wrongly) looks one up gets `KeyError: 'encoder'`, as if the app had
    no model of that name, instead of PAMIQ's message saying why.
    """
    app = App()
    app.add_model(
        "encoder",
        lambda: TorchTrainingModel(nn.Linear(2, 2), inference_thread_only=True),
    )
    seen: list[BaseException] = []

    class Probe(Trainer):
        def on_training_models_attached(self) -> None:
            try:
                self.get_training_model("encoder")
            except KeyError as exc:
                seen.append(exc)

        def train(self) -> None:
            pass

    app.add_trainer("probe", Probe)
    _loop(app, torch.device("cpu"))

    assert len(seen) == 1
    assert "inference thread only" in str(seen[0]), (
        f"the trainer got {seen[0]!r}, which does not say that 'encoder' is inference-only"
    )


def test_the_trainer_service_says_when_its_device_overrides_the_factory_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """§2.3 step 6: `TorchTrainingModel(..., device=...)` puts the module on that device. Across
    machines the service's `--device` is the host's placement and puts every model there
    (docs/configuration.md says so); a factory that asked for another device is told so in
    the log, not silently moved. Shown with the service told `meta`, the factory `cpu`.
    """
    app = App()
    app.add_model(
        "cpu_model",
        lambda: TorchTrainingModel(nn.Linear(2, 2), has_inference_model=False, device="cpu"),
    )
    app.add_model(
        "anywhere", lambda: TorchTrainingModel(nn.Linear(2, 2), has_inference_model=False)
    )
    with caplog.at_level(logging.WARNING):
        loop = _loop(app, torch.device("meta"))

    for name in ("cpu_model", "anywhere"):
        module = loop.models.data[name].model
        assert next(module.parameters()).device == torch.device("meta")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "model cpu_model: its factory asked for device cpu; this service's --device puts it on meta"
    ]


def test_a_factory_may_name_a_device_this_host_lacks(caplog: pytest.LogCaptureFixture) -> None:
    """One app serves a GPU trainer and a CPU inference host: a factory asking for a GPU this
    host does not have (here an index no host has) is placed on the service's device, with the
    warning, not refused because moving it there first failed."""
    app = App()
    app.add_model(
        "gpu_model",
        lambda: TorchTrainingModel(nn.Linear(2, 2), has_inference_model=False, device="cuda:99"),
    )
    with caplog.at_level(logging.WARNING):
        loop = _loop(app, torch.device("cpu"))
    model = loop.models.data["gpu_model"]
    assert next(model.model.parameters()).device == torch.device("cpu")
    assert model.requested_device == torch.device("cuda:99")
    assert "its factory asked for device cuda:99; this service's --device puts it on cpu" in (
        caplog.text
    )
