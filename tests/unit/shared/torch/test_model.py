"""PAMIQ-Core's torch model behaviours (pamiq_core.md §5.3), plus the remote sync path."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from shared.model import RemoteInferenceModel
from shared.torch import (
    TorchInferenceModel,
    TorchTrainingModel,
    UnwrappedContextManager,
    default_infer_procedure,
    get_device,
)

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


class CustomModel(nn.Module):
    not_callable = 3

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out

    def custom_inference(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self(x) / temperature


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None, use_b: bool = True) -> Any:
        return a + b if use_b and b is not None else a


def test_get_device() -> None:
    assert get_device(nn.Linear(2, 2)) == torch.device("cpu")
    buffers_only = nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1))
    assert get_device(buffers_only) == torch.device("cpu")
    assert get_device(nn.Module(), torch.device("meta")) == torch.device("meta")
    assert get_device(nn.Module()) == torch.get_default_device()


@pytest.mark.parametrize("device", DEVICES)
def test_default_infer_procedure_moves_top_level_tensors(device: str) -> None:
    model = TwoInputs().to(device)
    model.register_buffer("anchor", torch.zeros(1, device=device))
    a, b = torch.ones(2), torch.full((2,), 2.0)
    out = default_infer_procedure(model, a, b=b)
    assert out.device == torch.device(device)
    assert torch.equal(out.cpu(), a + b)
    assert torch.equal(default_infer_procedure(model, a, b=b, use_b=False).cpu(), a)


class CountingLock:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.acquired = 0
        self.released = 0

    def acquire(self) -> bool:
        self.acquired += 1
        return self.lock.acquire()

    def release(self) -> None:
        self.released += 1
        self.lock.release()


def test_unwrapped_context_manager() -> None:
    model = CustomModel()
    lock = CountingLock()
    with UnwrappedContextManager(model, lock, inference_mode=True) as raw:  # type: ignore[arg-type]
        assert raw is model
        assert lock.acquired == 1 and lock.released == 0
        assert not raw(torch.ones(1, 3)).requires_grad
    assert lock.released == 1
    with UnwrappedContextManager(model, lock, inference_mode=False) as raw:  # type: ignore[arg-type]
        raw(torch.ones(1, 3)).sum().backward()
    assert model.linear.weight.grad is not None
    rlock = threading.RLock()
    with UnwrappedContextManager(model, rlock, True), UnwrappedContextManager(model, rlock, True):
        pass  # nested on one RLock: no deadlock


def test_torch_inference_model() -> None:
    model = CustomModel()
    inference = TorchInferenceModel(model, default_infer_procedure)
    assert inference._raw_model is model
    x = torch.randn(4, 3)
    out = inference(x)
    assert torch.equal(out, model(x))
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError):
        out.sum().backward()
    assert isinstance(inference.unwrap(), UnwrappedContextManager)
    with inference.unwrap():
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()
    with inference.unwrap(inference_mode=False):
        assert not torch.is_inference_mode_enabled()


def test_creation_copies_or_shares_the_module() -> None:
    model = TorchTrainingModel(CustomModel())
    copy = model.inference_model._raw_model
    assert copy is not model.model
    for a, b in zip(copy.parameters(), model.model.parameters(), strict=True):
        assert torch.equal(a, b)
    shared = TorchTrainingModel(CustomModel(), inference_thread_only=True)
    assert shared.inference_model._raw_model is shared.model


@pytest.mark.parametrize("flags", [(True, False), (True, True), (False, False)])
def test_forward_is_the_module(flags: tuple[bool, bool]) -> None:
    model = TorchTrainingModel(CustomModel(), *flags)
    x = torch.randn(2, 3)
    assert torch.equal(model(x), model.model(x))


@pytest.mark.parametrize("device", DEVICES)
def test_local_sync_swaps_and_keeps_data_and_grads(device: str) -> None:
    model = TorchTrainingModel(CustomModel(), device=device)
    inference = model.inference_model
    with torch.no_grad():
        model.model.linear.weight.add_(1.0)
    model(torch.randn(2, 3, device=device)).sum().backward()
    weight = model.model.linear.weight.detach().clone()
    grad = model.model.linear.weight.grad
    assert grad is not None
    grad = grad.clone()
    assert not torch.equal(inference._raw_model.linear.weight, weight)
    assert inference._raw_model.linear.weight.grad is None
    model.sync()
    assert torch.equal(model.model.linear.weight, weight)
    assert torch.equal(model.model.linear.weight.grad, grad)
    assert torch.equal(inference._raw_model.linear.weight, weight)
    assert inference._raw_model.linear.weight is not model.model.linear.weight
    assert inference._raw_model.linear.weight.grad is None
    assert model.model.training and not inference._raw_model.training


class Recorder(RemoteInferenceModel):
    def __init__(self) -> None:
        self.received: list[dict[str, torch.Tensor]] = []

    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.received.append({k: v.clone() for k, v in weights.items()})


def test_remote_sync_publishes_the_state_and_leaves_the_training_side_alone() -> None:
    model = TorchTrainingModel(CustomModel())
    remote = Recorder()
    model.attach_inference_model(remote)
    module = model.model
    module(torch.randn(2, 3)).sum().backward()
    grad = module.linear.weight.grad
    model.sync()
    assert model.model is module and module.linear.weight.grad is grad and module.training
    (received,) = remote.received
    assert received.keys() == module.state_dict().keys()
    for name, tensor in module.state_dict().items():
        assert torch.equal(received[name], tensor)
    with pytest.raises(RuntimeError, match="lives in remote inference services"):
        remote.infer(torch.zeros(1, 3))


def test_save_and_load_state_round_trip_bit_exactly(tmp_path: Path) -> None:
    model = TorchTrainingModel(CustomModel())
    saved = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.save_state(tmp_path / "model_params")
    assert (tmp_path / "model_params.safetensors").is_file()
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    model.load_state(tmp_path / "model_params")
    loaded = model.model.state_dict()
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor)


def test_save_state_handles_tied_weights(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    module[1].weight = module[0].weight
    model = TorchTrainingModel(module)
    model.save_state(tmp_path / "tied")
    model.load_state(tmp_path / "tied")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("device", DEVICES)
def test_pretrained_parameter_file(tmp_path: Path, suffix: str, device: str) -> None:
    state = CustomModel().state_dict()
    path = tmp_path / f"params{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, path)
    model = TorchTrainingModel(CustomModel(), device=device, pretrained_parameter_file=path)
    for module in (model.model, model.inference_model._raw_model):
        assert module.linear.weight.device == torch.device(device)
        assert torch.equal(module.linear.weight.cpu(), state["linear.weight"])
        assert torch.equal(module.linear.bias.cpu(), state["linear.bias"])


def test_dtype_converts_the_module() -> None:
    model = TorchTrainingModel(CustomModel(), dtype=torch.float64)
    assert model.model.linear.weight.dtype == torch.float64


def test_inference_procedure_by_method_name() -> None:
    model = TorchTrainingModel(CustomModel(), inference_procedure="custom_inference")
    x = torch.randn(2, 3)
    full = model.inference_model(x)
    halved = model.inference_model(x, temperature=2.0)
    assert torch.allclose(halved, full / 2)
    assert model.inference_procedure is CustomModel.custom_inference
    with pytest.raises(AttributeError, match="does not have a method named 'non_existent_method'"):
        TorchTrainingModel(CustomModel(), inference_procedure="non_existent_method")
    with pytest.raises(ValueError, match="is not a callable method"):
        TorchTrainingModel(CustomModel(), inference_procedure="not_callable")
