"""PAMIQ-Core's torch models (pamiq_core.md §5.3), plus remote sync and safetensors state."""

from __future__ import annotations

import pickle
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
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
def test_remote_sync_publishes_the_state_dict_and_leaves_training_alone(
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
    assert module.training is train_mode
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


def test_save_and_load_state_round_trip_bit_exactly(tmp_path: Path, device: torch.device) -> None:
    model = TorchTrainingModel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), device=device)
    model.model(torch.randn(8, 3, device=device))  # moves the running statistics
    saved = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.save_state(tmp_path / "model_params")
    assert [p.name for p in tmp_path.iterdir()] == ["model_params.safetensors"]
    assert safetensors.torch.load_file(tmp_path / "model_params.safetensors").keys() == saved.keys()
    with torch.no_grad():
        for tensor in model.model.state_dict().values():
            tensor.add_(1)
    model.load_state(tmp_path / "model_params")
    loaded = model.model.state_dict()
    assert list(loaded) == list(saved)
    for name, tensor in saved.items():
        assert loaded[name].device == device and loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_load_state_is_strict_and_needs_the_file(tmp_path: Path) -> None:
    TorchTrainingModel(nn.Linear(3, 2, bias=False)).save_state(tmp_path / "m")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
        TorchTrainingModel(nn.Linear(3, 2)).load_state(tmp_path / "m")
    with pytest.raises(
        FileNotFoundError,
        match=rf"^no saved model state at {re.escape(f'{tmp_path}/x.safetensors')}; "
        rf"save_state\({re.escape(f'{tmp_path}/x')}\) writes that file$",
    ):
        TorchTrainingModel(nn.Linear(3, 2)).load_state(tmp_path / "x")


def test_save_state_unties_shared_tensors_and_load_keeps_the_tie(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    module[1].weight = module[0].weight
    weight = module[0].weight.detach().clone()
    model = TorchTrainingModel(module, has_inference_model=False)
    model.save_state(tmp_path / "tied")
    on_disk = safetensors.torch.load_file(tmp_path / "tied.safetensors")
    assert on_disk.keys() == {"0.weight", "1.weight"}
    assert torch.equal(on_disk["0.weight"], weight) and torch.equal(on_disk["1.weight"], weight)
    with torch.no_grad():
        module[0].weight.zero_()
    model.load_state(tmp_path / "tied")
    assert module[1].weight is module[0].weight
    assert torch.equal(module[0].weight, weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_parameter_file(tmp_path: Path, suffix: str, device: torch.device) -> None:
    state = CustomModel().state_dict()
    path = tmp_path / f"params{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, path)
    model = TorchTrainingModel(CustomModel(), device=device, pretrained_parameter_file=path)
    for module in (model.model, model.inference_model._raw_model):
        assert module.linear.weight.device == device
        assert torch.equal(module.linear.weight.cpu(), state["linear.weight"])
        assert torch.equal(module.linear.bias.cpu(), state["linear.bias"])


class Payload:
    """Something a pickle could smuggle in."""


def test_pretrained_torch_file_never_unpickles_objects(tmp_path: Path) -> None:
    path = tmp_path / "params.pt"
    torch.save({**CustomModel().state_dict(), "payload": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TorchTrainingModel(CustomModel(), pretrained_parameter_file=path)


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
