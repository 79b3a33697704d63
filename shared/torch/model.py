"""PAMIQ-Core's torch models.

`TorchInferenceModel` runs a module under a lock. `TorchTrainingModel` trains a module and syncs
it into its inference copy: locally by PAMIQ's module swap, remotely by publishing the state dict
to a `RemoteInferenceModel`. Weights on disk are safetensors; nothing here unpickles.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import safetensors.torch
import torch
from torch import nn
from torch.nn.parameter import is_lazy
from typing_extensions import override

from shared.model.interface import InferenceModel, TrainingModel
from shared.model.remote import RemoteInferenceModel

M = TypeVar("M", bound=nn.Module)
M_contra = TypeVar("M_contra", bound=nn.Module, contravariant=True)


class InferenceProcedureCallable(Protocol[M_contra]):
    """How to run a module for inference: `procedure(model, *args, **kwds)`."""

    def __call__(self, model: M_contra, /, *args: Any, **kwds: Any) -> Any: ...


def get_device(module: nn.Module, default_device: torch.device | None = None) -> torch.device:
    """The device a module runs on.

    Args:
        module: The module.
        default_device: What to return for a module with no parameters and no buffers
            (None: `torch.get_default_device()`).

    Returns:
        The device of the first parameter, else of the first buffer, else the default.
    """
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return default_device if default_device is not None else torch.get_default_device()


def default_infer_procedure(model: nn.Module, *args: Any, **kwds: Any) -> Any:
    """Move the top-level tensor arguments to the model's device, then call the model.

    Tensors nested in containers are not moved; write your own procedure for those.

    Args:
        model: The module to run.
        *args: Its positional inputs.
        **kwds: Its keyword inputs.

    Returns:
        `model(*args, **kwds)` with the tensors moved.
    """
    device = get_device(model)
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    moved_kwds = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwds.items()}
    return model(*moved, **moved_kwds)


class UnwrappedContextManager(Generic[M]):
    """`with` access to a raw module, holding its lock (and inference mode, by default).

    Enters inference mode, then takes the lock; on exit releases the lock, then leaves
    inference mode.

    Args:
        model: The module the `with` block gets.
        lock: The lock that guards it.
        inference_mode: Whether the block runs under `torch.inference_mode()`.
    """

    def __init__(self, model: M, lock: threading.RLock, inference_mode: bool) -> None:
        self._model = model
        self._lock = lock
        self._inference_mode = inference_mode
        self._mode: torch.inference_mode | None = None

    def __enter__(self) -> M:
        self._mode = torch.inference_mode(self._inference_mode)
        self._mode.__enter__()
        self._lock.acquire()
        return self._model

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
        if self._mode is not None:
            self._mode.__exit__(exc_type, exc, tb)
            self._mode = None


class TorchInferenceModel(InferenceModel, Generic[M]):
    """Runs a module's inference procedure under a lock that a sync's swap also takes.

    Args:
        model: The module to serve.
        inference_procedure: How to run it: `inference_procedure(model, *args, **kwds)`.
    """

    def __init__(self, model: M, inference_procedure: InferenceProcedureCallable[M]) -> None:
        self._model = model
        self._inference_procedure = inference_procedure
        self._lock = threading.RLock()

    @property
    def _raw_model(self) -> M:
        """The module, without the lock; the setter takes it (do not use from inference)."""
        return self._model

    @_raw_model.setter
    def _raw_model(self, model: M) -> None:
        with self._lock:
            self._model = model

    @override
    @torch.inference_mode()
    def infer(self, *args: Any, **kwds: Any) -> Any:
        """Run the inference procedure under the lock and `torch.inference_mode()`."""
        with self._lock:
            return self._inference_procedure(self._model, *args, **kwds)

    def unwrap(self, inference_mode: bool = True) -> UnwrappedContextManager[M]:
        """Thread-safe raw access to the module: `with model.unwrap() as module: ...`.

        Args:
            inference_mode: Whether the block runs under `torch.inference_mode()`.

        Returns:
            A context manager that yields the module while holding the lock.
        """
        return UnwrappedContextManager(self._raw_model, self._lock, inference_mode)


def _resolve_procedure(
    model: M, procedure: InferenceProcedureCallable[M] | str
) -> InferenceProcedureCallable[M]:
    if not isinstance(procedure, str):
        return procedure
    cls = type(model)
    if not hasattr(cls, procedure):
        raise AttributeError(
            f"The model class {cls.__name__} does not have a method named '{procedure}'"
        )
    method = getattr(cls, procedure)
    if not callable(method):
        raise ValueError(
            f"The specified inference_procedure '{procedure}' is not a callable method on "
            f"{cls.__name__}"
        )
    resolved: InferenceProcedureCallable[M] = method
    return resolved


def _load_parameter_file(module: nn.Module, path: str | Path, device: torch.device) -> None:
    """Load `path` (safetensors, or a torch state dict) into `module`, strictly. A file may
    hold tied weights under one of their names only (safetensors' `save_model`, Hugging Face
    files): the others are filled from it, as `load_model` ties them back."""
    if str(path).endswith(".safetensors"):
        state = safetensors.torch.load_file(str(path), device=str(device))
    else:
        state = torch.load(path, map_location=device, weights_only=True)
    tied: dict[tuple[object, ...], list[str]] = {}  # the same elements under several names
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            key = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride())
            tied.setdefault(key, []).append(name)
    for names in tied.values():
        given = [n for n in names if n in state]
        for name in names if given else ():
            state.setdefault(name, state[given[0]])
    module.load_state_dict(state)


def _untied_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, contiguous, with tensors that share storage cloned (safetensors refuses
    shared storage; loading copies into tied parameters, so the tie survives a round trip)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for name, tensor in tensor_state(module).items():
        tensor = tensor.detach().contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        state[name] = tensor
    return state


def tensor_state(module: nn.Module, model_name: str | None = None) -> dict[str, torch.Tensor]:
    """`module.state_dict()`, every entry of which must be a tensor.

    Raises:
        TypeError: An entry is something else (the extra state of a module whose
            `get_extra_state` returns no tensor: saving or sending it would need pickle), or
            a lazy module's parameter not initialized yet.
    """
    state = module.state_dict()
    for key, value in state.items():
        owner = f"model {model_name!r}: " if model_name is not None else ""
        if isinstance(value, torch.Tensor) and is_lazy(value):
            raise TypeError(
                f"{owner}{key!r} is not initialized yet (a lazy module, nn.LazyLinear and "
                "the like): run the module once on an example input in the model's factory, "
                "so that every shape is known before its weights are saved or sent"
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{owner}{key!r} in the state dict is a {type(value).__name__}, not a tensor; "
                "weights are saved and sent as tensors only (never pickled): make "
                "get_extra_state return a tensor, or keep that state outside the module"
            )
    return state


# Set while a service calls the app's model factories: the service puts every module on its own
# --device afterwards, so a factory's `device` (a GPU on a trainer host) is not one this host
# must have.
_SERVICE_PLACES: ContextVar[bool] = ContextVar("service_places_models", default=False)


@contextmanager
def placed_by_service() -> Iterator[None]:
    """Within it, TorchTrainingModels keep their module where it is (`requested_device` still
    says what the factory asked for): the caller places it."""
    token = _SERVICE_PLACES.set(True)
    try:
        yield
    finally:
        _SERVICE_PLACES.reset(token)


class TorchTrainingModel(TrainingModel[TorchInferenceModel[M]], Generic[M]):
    """A torch module to train, with an inference copy kept in sync.

    Args:
        model: The module to train.
        has_inference_model: Whether the module has an inference copy (see TrainingModel).
        inference_thread_only: The module is only served, never trained; the inference copy
            is the module itself, not a copy.
        device: Where to put the module (None: where it already is). The services put every
            module on their own `--device`, the placement of the host they run on, and log
            a warning where that is not the device given here; within them the module is
            not moved here first, so the device need not exist on their host.
        dtype: Convert the module to this dtype first (None: keep).
        inference_procedure: How the inference copy runs the module, or the name of a method
            of the module's class.
        pretrained_parameter_file: Weights to load: a `.safetensors` file, or a torch state
            dict file, loaded with `weights_only=True`.
        compile: `nn.Module.compile()` the inference copy and the module.

    Raises:
        ValueError: Bad flags (see TrainingModel), or `inference_procedure` names an attribute
            that is not callable.
        AttributeError: `inference_procedure` names no attribute of the module's class.
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
        self.requested_device = None if device is None else torch.device(device)
        target = self.requested_device
        if target is None or _SERVICE_PLACES.get():  # a service places it on its own device
            target = get_device(model)
        self._inference_procedure = _resolve_procedure(model, inference_procedure)
        self.model.to(target)
        if pretrained_parameter_file is not None:
            _load_parameter_file(self.model, pretrained_parameter_file, target)
        if compile:
            if self.has_inference_model:
                self.inference_model._raw_model.compile()
            self.model.compile()

    @property
    def inference_procedure(self) -> InferenceProcedureCallable[M]:
        """How the inference copy runs the module (a method name resolved to the function)."""
        return self._inference_procedure

    @override
    def _create_inference_model(self) -> TorchInferenceModel[M]:
        model = self.model if self.inference_thread_only else copy.deepcopy(self.model)
        return TorchInferenceModel(model, self._inference_procedure)

    @override
    def forward(self, *args: Any, **kwds: Any) -> Any:
        """`self.model(*args, **kwds)`; moving inputs to the device is the caller's job."""
        return self.model(*args, **kwds)

    @override
    def sync_impl(self, inference_model: TorchInferenceModel[M]) -> None:
        """Make the inference copy hold the training weights.

        A `RemoteInferenceModel` gets `publish(self.model.state_dict())`, and the training
        module is put in train mode, as PAMIQ's swap leaves it (a trainer that ran an
        evaluation in eval mode trains in train mode again); its grads are untouched. A local
        copy gets PAMIQ's swap: the
        trained module becomes the inference module (in eval mode), the old inference module
        takes the trained weights and the grads and becomes `self.model` (in train mode).

        Args:
            inference_model: The inference copy.
        """
        if isinstance(inference_model, RemoteInferenceModel):
            inference_model.publish(self.model.state_dict())
            self.model.train()
            return
        self.model.eval()
        grads: list[torch.Tensor | None] = []
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
        """Write the module's state dict to `f"{path}.safetensors"`.

        Args:
            path: The file path without its suffix.
        """
        safetensors.torch.save_file(_untied_state_dict(self.model), f"{path}.safetensors")

    @override
    def load_state(self, path: Path) -> None:
        """Load `f"{path}.safetensors"` into the module, strictly, on the module's device.

        Args:
            path: The path given to `save_state`.

        Raises:
            FileNotFoundError: There is no such file.
            ValueError: A tensor was saved in another dtype than the module has it in.
            RuntimeError: Tensors are missing, unexpected or of another shape
                (`load_state_dict`'s strict check).
        """
        file = Path(f"{path}.safetensors")
        if not file.is_file():
            raise FileNotFoundError(
                f"no saved model state at {file}; save_state({path}) writes that file"
            )
        state = safetensors.torch.load_file(file, device=str(get_device(self.model)))
        for name, tensor in self.model.state_dict().items():
            saved = state.get(name)
            if saved is not None and saved.dtype != tensor.dtype:
                raise ValueError(
                    f"{file}: tensor {name!r} was saved as {saved.dtype} but the module has it "
                    f"as {tensor.dtype}; loading would convert it (move the file away to start "
                    "from the module's own weights)"
                )
        self.model.load_state_dict(state)
