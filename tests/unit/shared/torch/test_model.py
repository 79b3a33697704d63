"""PAMIQ-Core's torch models (pamiq_core.md §5.3), plus remote sync; their files are in
test_model_files.py."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from shared.model import RemoteInferenceModel, TrainingModelsDict
from shared.torch import (
    TorchInferenceModel,
    TorchTrainingModel,
    UnwrappedContextManager,
    default_infer_procedure,
    get_device,
)
from tests.unit.shared.torch.modules import CustomModel


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, a: torch.Tensor, b: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        return self.weight * (a + b if use_b else a)


def test_get_device(device: torch.device) -> None:
    assert get_device(nn.Linear(2, 2, device=device)) == device
    buffers_only = nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1, device=device))
    assert get_device(buffers_only) == device
    assert get_device(nn.Module(), torch.device("meta")) == torch.device("meta")
    assert get_device(nn.Module()) == torch.get_default_device()


def test_default_infer_procedure_moves_top_level_tensors(device: torch.device) -> None:
    model = TwoInputs().to(device)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    out = default_infer_procedure(model, a, b=b)
    assert out.device == device
    assert torch.equal(out, model(a.to(device), b.to(device)))
    assert torch.equal(out.cpu(), torch.tensor([4.0, 7.0]))
    assert torch.equal(default_infer_procedure(model, a, b, use_b=False).cpu(), a)


class RecordingLock:
    """An RLock that records, at each acquire and release, whether inference mode is on."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log: list[tuple[str, bool]] = []

    def acquire(self) -> bool:
        self.log.append(("acquire", torch.is_inference_mode_enabled()))
        return self.lock.acquire()

    def release(self) -> None:
        self.log.append(("release", torch.is_inference_mode_enabled()))
        self.lock.release()


def test_unwrapped_context_manager_in_inference_mode() -> None:
    model = nn.Linear(3, 2)
    lock = RecordingLock()
    manager = UnwrappedContextManager(model, lock, inference_mode=True)  # type: ignore[arg-type]
    with manager as raw:
        assert raw is model
        assert lock.log == [("acquire", True)]
        out = raw(torch.ones(1, 3))
        assert not out.requires_grad and out.is_inference()
    # the lock is taken inside inference mode and released before leaving it
    assert lock.log == [("acquire", True), ("release", True)]
    assert not torch.is_inference_mode_enabled()


def test_unwrapped_context_manager_without_inference_mode() -> None:
    model = nn.Linear(3, 2)
    lock = RecordingLock()
    manager = UnwrappedContextManager(model, lock, inference_mode=False)  # type: ignore[arg-type]
    with manager as raw:
        raw(torch.ones(1, 3)).sum().backward()
    assert lock.log == [("acquire", False), ("release", False)]
    assert model.weight.grad is not None
    assert torch.equal(model.weight.grad, torch.ones(2, 3))


def test_nested_unwrapped_context_managers_on_one_rlock_do_not_deadlock() -> None:
    model = nn.Linear(3, 2)
    lock = threading.RLock()
    with UnwrappedContextManager(model, lock, True) as outer:
        with UnwrappedContextManager(model, lock, False) as inner:
            assert inner is outer is model
            assert not torch.is_inference_mode_enabled()
        assert torch.is_inference_mode_enabled()
    assert lock.acquire(blocking=False)  # released as many times as taken
    lock.release()


def test_torch_inference_model_infers_without_autograd(device: torch.device) -> None:
    model = nn.Linear(3, 2, device=device)
    inference = TorchInferenceModel(model, default_infer_procedure)
    assert inference._raw_model is model
    x = torch.randn(4, 3)
    out = inference(x)
    assert out.device == device
    assert torch.equal(out, model(x.to(device)))
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()


def test_unwrap_gives_the_module_in_inference_mode_by_default() -> None:
    model = nn.Linear(3, 2)
    inference = TorchInferenceModel(model, default_infer_procedure)
    manager = inference.unwrap()
    assert isinstance(manager, UnwrappedContextManager)
    assert not torch.is_inference_mode_enabled()
    with manager as raw:
        assert raw is model
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()
    with inference.unwrap(inference_mode=False) as raw:
        assert raw is model
        assert not torch.is_inference_mode_enabled()


def test_a_swap_waits_for_the_inference_in_flight() -> None:
    started, finish = threading.Event(), threading.Event()
    results: list[Any] = []

    def slow(model: nn.Module, x: torch.Tensor) -> Any:
        started.set()
        assert finish.wait(10)
        return model(x)

    old, new = nn.Linear(3, 2), nn.Linear(3, 2)
    inference = TorchInferenceModel(old, slow)
    x = torch.ones(1, 3)
    infer = threading.Thread(target=lambda: results.append(inference(x)))
    infer.start()
    assert started.wait(10)
    swap = threading.Thread(target=setattr, args=(inference, "_raw_model", new))
    swap.start()
    swap.join(0.2)
    assert swap.is_alive()  # blocked on the lock the inference holds
    assert inference._raw_model is old
    finish.set()
    infer.join(10)
    swap.join(10)
    assert inference._raw_model is new
    assert torch.equal(results[0], old(x))  # the request in flight finished on the old module


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, tensor in sa.items():
        assert tensor.dtype == sb[name].dtype and torch.equal(tensor, sb[name]), name


def test_creation_deep_copies_the_module(device: torch.device) -> None:
    model = TorchTrainingModel(CustomModel(), device=device)
    copy = model.inference_model._raw_model
    assert copy is not model.model
    assert copy.linear.weight is not model.model.linear.weight
    assert get_device(model.model) == get_device(copy) == device
    assert_same_state(copy, model.model)
    assert model.inference_procedure is default_infer_procedure


def test_inference_thread_only_shares_the_module() -> None:
    model = TorchTrainingModel(CustomModel(), inference_thread_only=True)
    assert model.inference_model._raw_model is model.model


def test_no_inference_model() -> None:
    model = TorchTrainingModel(CustomModel(), has_inference_model=False)
    with pytest.raises(RuntimeError, match="created with has_inference_model=False"):
        model.inference_model  # noqa: B018


@pytest.mark.parametrize("flags", [(True, False), (True, True), (False, False)])
def test_forward_is_the_module(flags: tuple[bool, bool]) -> None:
    model = TorchTrainingModel(CustomModel(), *flags)
    x = torch.randn(2, 3)
    assert torch.equal(model(x), model.model(x))
    assert torch.equal(model.forward(x), model.model(x))


def test_local_sync_keeps_the_training_data_and_grads(device: torch.device) -> None:
    model = TorchTrainingModel(CustomModel(), device=device)
    inference = model.inference_model
    with torch.no_grad():
        model.model.linear.weight.add_(1.0)
    model(torch.randn(2, 3, device=device)).sum().backward()
    weight = model.model.linear.weight.detach().clone()
    assert model.model.linear.weight.grad is not None
    grad = model.model.linear.weight.grad.clone()
    assert not torch.equal(inference._raw_model.linear.weight, weight)
    assert inference._raw_model.linear.weight.grad is None
    model.sync()
    assert torch.equal(model.model.linear.weight, weight)
    assert model.model.linear.weight.grad is not None
    assert torch.equal(model.model.linear.weight.grad, grad)
    assert torch.equal(inference._raw_model.linear.weight, weight)
    assert inference._raw_model.linear.weight is not model.model.linear.weight
    assert inference._raw_model.linear.weight.grad is None
    assert model.inference_model is inference
    x = torch.randn(4, 3, device=device)
    assert torch.equal(inference(x), model(x).detach())


def test_local_sync_swaps_the_module_objects_and_modes() -> None:
    model = TorchTrainingModel(CustomModel())
    training, serving = model.model, model.inference_model._raw_model
    model.sync()
    assert model.model is serving and model.inference_model._raw_model is training
    assert model.model.training and not training.training
    model.sync()
    assert model.model is training and model.inference_model._raw_model is serving
    assert training.training and not serving.training


class Recorder(RemoteInferenceModel):
    def __init__(self) -> None:
        self.received: list[dict[str, torch.Tensor]] = []

    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.received.append(dict(weights))


class NoLocalCopy(TorchTrainingModel[nn.Module]):
    def _create_inference_model(self) -> TorchInferenceModel[nn.Module]:
        raise AssertionError("a local inference copy was created")


@pytest.mark.parametrize("train_mode", [True, False])
def test_remote_sync_publishes_the_state_dict_and_leaves_the_module_training(
    device: torch.device, train_mode: bool
) -> None:
    model = NoLocalCopy(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), device=device)
    remote = Recorder()
    model.attach_inference_model(remote)
    assert TrainingModelsDict({"m": model}).inference_models_dict["m"] is remote
    module = model.model
    module(torch.randn(8, 3, device=device)).sum().backward()
    module.train(train_mode)
    grads = [p.grad for p in module.parameters()]
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    model.sync()
    assert model.model is module
    assert module.training  # as PAMIQ's swap leaves it, whatever mode train() left
    assert all(p.grad is g for p, g in zip(module.parameters(), grads, strict=True))
    (received,) = remote.received
    assert list(received) == list(expected)
    for name, tensor in expected.items():
        assert received[name].dtype == tensor.dtype and received[name].device == device
        assert torch.equal(received[name], tensor), name
    model.sync()
    assert len(remote.received) == 2


def test_remote_inference_model_refuses_to_infer() -> None:
    with pytest.raises(
        RuntimeError,
        match=r"^cannot infer on the trainer: the inference copy of this model lives in remote "
        r"inference services; query them over the Open Inference Protocol$",
    ):
        Recorder()(torch.zeros(1, 3))


def test_dtype_converts_both_copies() -> None:
    model = TorchTrainingModel(CustomModel(), dtype=torch.float64)
    assert model.model.linear.weight.dtype == torch.float64
    assert model.inference_model._raw_model.linear.weight.dtype == torch.float64
    assert model.inference_model(torch.ones(1, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
@pytest.mark.parametrize("has_inference_model", [True, False])
def test_compile_compiles_both_copies(
    monkeypatch: pytest.MonkeyPatch, has_inference_model: bool
) -> None:
    compiled: list[nn.Module] = []
    original = nn.Module.compile

    def spy(self: nn.Module, *args: Any, **kwds: Any) -> None:
        compiled.append(self)
        original(self, *args, **kwds)

    monkeypatch.setattr(nn.Module, "compile", spy)
    model = TorchTrainingModel(CustomModel(), has_inference_model, compile=True)
    if not has_inference_model:
        assert len(compiled) == 1 and compiled[0] is model.model
        return
    assert len(compiled) == 2
    assert compiled[0] is model.inference_model._raw_model and compiled[1] is model.model
    x = torch.randn(4, 3)
    assert torch.allclose(model.inference_model(x), model(x).detach())
    with torch.no_grad():
        model.model.linear.weight.add_(1.0)
    model.sync()
    assert torch.allclose(model.inference_model(x), model(x).detach())


def test_inference_procedure_by_method_name() -> None:
    model = TorchTrainingModel(CustomModel(), inference_procedure="custom_inference")
    assert model.inference_procedure is CustomModel.custom_inference
    x = torch.randn(2, 3)
    full = model.inference_model(x)
    assert torch.equal(full, model.model(x).detach())
    assert torch.allclose(model.inference_model(x, temperature=2.0), full / 2)
    with pytest.raises(
        AttributeError,
        match=r"^The model class CustomModel does not have a method named 'non_existent_method'$",
    ):
        TorchTrainingModel(CustomModel(), inference_procedure="non_existent_method")
    with pytest.raises(
        ValueError,
        match=r"^The specified inference_procedure 'not_callable' is not a callable method on "
        r"CustomModel$",
    ):
        TorchTrainingModel(CustomModel(), inference_procedure="not_callable")
