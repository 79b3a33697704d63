"""PAMIQ-Core's torch models (pamiq_core.md §5.3), plus remote sync and safetensors state."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

from shared.torch import (
    TorchInferenceModel,
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
    with UnwrappedContextManager(model, lock, True) as outer:  # noqa: SIM117
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
