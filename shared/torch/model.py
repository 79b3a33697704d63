"""PAMIQ-Core's torch models: an inference wrapper guarded by a lock, and the training model
that creates it and syncs into it (locally by a module swap, remotely through the sync plane)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import safetensors.torch
import torch
from torch import nn
from typing_extensions import override

from shared.model.interface import InferenceModel, TrainingModel
from shared.model.remote import RemoteInferenceModel

M = TypeVar("M", bound=nn.Module)
M_contra = TypeVar("M_contra", bound=nn.Module, contravariant=True)


class InferenceProcedureCallable(Protocol[M_contra]):
    """How to run a module for inference: `procedure(model, *args, **kwds)`."""

    def __call__(self, model: M_contra, /, *args: Any, **kwds: Any) -> Any: ...


def get_device(module: nn.Module, default_device: torch.device | None = None) -> torch.device:
    """The device of the module's first parameter, else first buffer, else the default."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return default_device if default_device is not None else torch.get_default_device()


def default_infer_procedure(model: nn.Module, *args: Any, **kwds: Any) -> Any:
    """Move top-level tensor arguments to the model's device and call it."""
    device = get_device(model)
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    moved_kwds = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwds.items()}
    return model(*moved, **moved_kwds)


class UnwrappedContextManager(Generic[M]):
    """`with` access to a raw module under the model's lock (and inference mode by default)."""

    def __init__(self, model: M, lock: threading.RLock, inference_mode: bool) -> None:
        self._model = model
        self._lock = lock
        self._inference_mode = torch.inference_mode(inference_mode)

    def __enter__(self) -> M:
        self._inference_mode.__enter__()
        self._lock.acquire()
        return self._model

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
        self._inference_mode.__exit__(exc_type, exc, tb)


class TorchInferenceModel(InferenceModel, Generic[M]):
    """Runs a module's inference procedure under a lock that a sync's swap also takes."""

    def __init__(self, model: M, inference_procedure: InferenceProcedureCallable[M]) -> None:
        self._model = model
        self._inference_procedure = inference_procedure
        self._lock = threading.RLock()

    @property
    def _raw_model(self) -> M:
        return self._model

    @_raw_model.setter
    def _raw_model(self, model: M) -> None:
        with self._lock:
            self._model = model

    @override
    @torch.inference_mode()
    def infer(self, *args: Any, **kwds: Any) -> Any:
        with self._lock:
            return self._inference_procedure(self._model, *args, **kwds)

    def unwrap(self, inference_mode: bool = True) -> UnwrappedContextManager[M]:
        """Thread-safe raw access to the module: `with model.unwrap() as module: ...`."""
        return UnwrappedContextManager(self._raw_model, self._lock, inference_mode)


def _load_parameter_file(path: str | Path, device: torch.device) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        return safetensors.torch.load_file(str(path), device=str(device))
    loaded: dict[str, torch.Tensor] = torch.load(path, map_location=device, weights_only=True)
    return loaded


class TorchTrainingModel(TrainingModel[TorchInferenceModel[M]], Generic[M]):
    """A torch module to train, with an inference copy kept in sync.

    Args:
        model: the module to train.
        has_inference_model / inference_thread_only: see TrainingModel.
        device: where the module lives (default: where it already is).
        dtype: convert the module to this dtype first.
        inference_procedure: how the inference copy runs the module, or the name of a method of
            the module's class.
        pretrained_parameter_file: weights to load (.safetensors, or a torch state-dict file
            loaded with weights_only=True).
        compile: `nn.Module.compile()` both copies.
    """

    def __init__(
        self,
        model: M,
        has_inference_model: bool = True,
        inference_thread_only: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        inference_procedure: InferenceProcedureCallable[M] | str = default_infer_procedure,
        pretrained_parameter_file: str | Path | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__(has_inference_model, inference_thread_only)
        if dtype is not None:
            model = model.type(dtype)
        self.model = model
        target = get_device(model) if device is None else torch.device(device)
        procedure: InferenceProcedureCallable[M]
        if isinstance(inference_procedure, str):
            name = inference_procedure
            cls = type(model)
            if not hasattr(cls, name):
                raise AttributeError(
                    f"The model class {cls.__name__} does not have a method named '{name}'"
                )
            method = getattr(cls, name)
            if not callable(method):
                raise ValueError(
                    f"The specified inference_procedure '{name}' is not a callable method on "
                    f"{cls.__name__}"
                )
            procedure = method
        else:
            procedure = inference_procedure
        self._inference_procedure = procedure
        self.model.to(target)
        if pretrained_parameter_file is not None:
            self.model.load_state_dict(_load_parameter_file(pretrained_parameter_file, target))
        if compile:
            if self.has_inference_model:
                self.inference_model._raw_model.compile()
            self.model.compile()

    @property
    def inference_procedure(self) -> InferenceProcedureCallable[M]:
        return self._inference_procedure

    @override
    def _create_inference_model(self) -> TorchInferenceModel[M]:
        model = self.model if self.inference_thread_only else copy.deepcopy(self.model)
        return TorchInferenceModel(model, self._inference_procedure)

    @override
    def forward(self, *args: Any, **kwds: Any) -> Any:
        return self.model(*args, **kwds)

    @override
    def sync_impl(self, inference_model: TorchInferenceModel[M]) -> None:
        remote: object = inference_model
        if isinstance(remote, RemoteInferenceModel):
            remote.publish(self.model.state_dict())
            return
        self.model.eval()
        grads = []
        for parameter in self.model.parameters():
            grads.append(parameter.grad)
            parameter.grad = None
        self.model, inference_model._raw_model = inference_model._raw_model, self.model
        self.model.load_state_dict(inference_model._raw_model.state_dict())
        for parameter, grad in zip(self.model.parameters(), grads, strict=True):
            parameter.grad = grad
        self.model.train()

    @override
    def save_state(self, path: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        seen: set[int] = set()
        for name, tensor in state.items():  # safetensors refuses shared storage: untie copies
            key = tensor.untyped_storage().data_ptr()
            if key in seen and tensor.numel():
                state[name] = tensor.clone()
            seen.add(key)
        safetensors.torch.save_file(state, f"{path}.safetensors")

    @override
    def load_state(self, path: Path) -> None:
        device = get_device(self.model)
        self.model.load_state_dict(safetensors.torch.load_file(f"{path}.safetensors", str(device)))
