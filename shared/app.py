"""The user's definition of models and trainers, and how the services find it.

Both services take the same import string (`package.module:attribute`, as uvicorn and gunicorn
take) naming an `App`. The app holds *factories*, never built models: the trainer service builds
the training models and trainers, the inference service builds only what it serves, so no process
holds a copy it does not need.

    app = App()

    @app.model("quickstart", inputs=[TensorSpec("x", "FP32", (-1, 1))],
               outputs=[TensorSpec("y", "FP32", (-1, 1))])
    def quickstart() -> TorchTrainingModel[MLP]:
        return TorchTrainingModel(MLP())

    app.add_trainer("quickstart", QuickstartTrainer)

An app may also declare experience buffers, which agents fill over the trainer's experience
plane (`RemoteDataCollector`) and trainers read as data users: each sample maps the buffer's
tensor names to tensors of the declared datatype and shape (-1: any size, the same within a
batch).

    app.add_buffer("steps", lambda: DictSequentialBuffer(["x", "y"], max_size=1000),
                   tensors=[TensorSpec("x", "FP32", (1,)), TensorSpec("y", "FP32", (1,))])

A model may declare `record="steps"`: the inference service then records the inputs and outputs
of every request it serves into that buffer (inference_service/recording.py).

A model may declare `served_dtype=torch.bfloat16` (or another floating dtype): its inference copy
then runs in that dtype while the trainer trains in its own. The trainer converts each floating
tensor before it hashes and pushes it, and the inference service builds the model in that dtype,
so the served weights are bit-exact to `weights.to(served_dtype)` (docs/sync.md). Default: the
dtype the model trains in.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from shared.dtypes import BYTES, OIP_DATATYPES
from shared.errors import ConfigurationError

if TYPE_CHECKING:
    from shared.data.buffer import DataBuffer
    from shared.model.interface import TrainingModel
    from shared.trainer.base import Trainer

ModelFactory = Callable[[], "TrainingModel[Any]"]
TrainerFactory = Callable[[], "Trainer"]
BufferFactory = Callable[[], "DataBuffer[Any, Any]"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a served model: its OIP name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in OIP_DATATYPES:
            raise ConfigurationError(
                f"tensor {self.name!r}: datatype {self.datatype!r} is not one of "
                f"{', '.join(sorted(OIP_DATATYPES))}"
            )
        if any(d < -1 for d in self.shape):
            raise ConfigurationError(
                f"tensor {self.name!r}: shape {list(self.shape)} may hold sizes >= 0 or -1 only"
            )
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build its TrainingModel, and what it takes and returns when served."""

    name: str
    build: ModelFactory
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    record: str | None = None  # the buffer the inference service records its requests into
    served_dtype: torch.dtype | None = None  # floating tensors are served in it (None: as trained)


@dataclass(frozen=True)
class BufferSpec:
    """A named experience buffer: how to build it, and the tensors each of its samples holds
    (shapes per sample; batches stack samples along a new first dimension)."""

    name: str
    build: BufferFactory
    tensors: tuple[TensorSpec, ...]


class App:
    """The registry of model, trainer and buffer factories that both services load."""

    def __init__(self) -> None:
        self._models: dict[str, ModelSpec] = {}
        self._trainers: dict[str, TrainerFactory] = {}
        self._buffers: dict[str, BufferSpec] = {}

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        return dict(self._models)

    @property
    def trainers(self) -> Mapping[str, TrainerFactory]:
        return dict(self._trainers)

    @property
    def buffers(self) -> Mapping[str, BufferSpec]:
        return dict(self._buffers)

    def add_model(
        self,
        name: str,
        build: ModelFactory,
        *,
        inputs: Iterable[TensorSpec] = (),
        outputs: Iterable[TensorSpec] = (),
        record: str | None = None,
        served_dtype: torch.dtype | None = None,
    ) -> None:
        """Declare the model `name`; with `record`, the inference service records the inputs
        and outputs of the requests it serves into that buffer (one the app declares); with
        `served_dtype`, its floating tensors are pushed and served in that dtype."""
        _check_name("model", name)
        if name in self._models:
            raise ConfigurationError(f"model {name!r} is defined twice")
        if served_dtype is not None and not served_dtype.is_floating_point:
            raise ConfigurationError(
                f"model {name!r}: served_dtype {served_dtype} is not a floating dtype"
            )
        spec = ModelSpec(name, build, tuple(inputs), tuple(outputs), record, served_dtype)
        for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise ConfigurationError(f"model {name!r}: {kind} names repeat: {names}")
        self._models[name] = spec

    def model(
        self,
        name: str,
        *,
        inputs: Iterable[TensorSpec] = (),
        outputs: Iterable[TensorSpec] = (),
        record: str | None = None,
        served_dtype: torch.dtype | None = None,
    ) -> Callable[[F], F]:
        """Decorator form of add_model."""

        def register(build: F) -> F:
            self.add_model(
                name,
                build,
                inputs=inputs,
                outputs=outputs,
                record=record,
                served_dtype=served_dtype,
            )
            return build

        return register

    def add_trainer(self, name: str, build: TrainerFactory) -> None:
        _check_name("trainer", name)
        if name in self._trainers:
            raise ConfigurationError(f"trainer {name!r} is defined twice")
        self._trainers[name] = build

    def add_buffer(self, name: str, build: BufferFactory, *, tensors: Iterable[TensorSpec]) -> None:
        """Declare the experience buffer `name`: `build` makes it (on the trainer), `tensors`
        are what each sample holds (BYTES excluded: samples are tensors)."""
        _check_name("buffer", name)
        if name in self._buffers:
            raise ConfigurationError(f"buffer {name!r} is defined twice")
        spec = BufferSpec(name, build, tuple(tensors))
        names = [t.name for t in spec.tensors]
        if not names:
            raise ConfigurationError(f"buffer {name!r}: declare the tensors its samples hold")
        if len(set(names)) != len(names):
            raise ConfigurationError(f"buffer {name!r}: tensor names repeat: {names}")
        for tensor in spec.tensors:
            if tensor.datatype == BYTES:
                raise ConfigurationError(
                    f"buffer {name!r}: tensor {tensor.name!r} is BYTES; samples hold tensors"
                )
        self._buffers[name] = spec


# Models, trainers and buffers name files and directories in the state directories
# (`models/<name>.safetensors`, `trainers/<name>`, ...): a file name holds 255 bytes, and the
# suffixes and temporary names need the rest.
MAX_NAME_BYTES = 200


def _check_name(kind: str, name: str) -> None:
    """ConfigurationError unless `name` can name a file: checked when the app is declared, not
    found out at the first checkpoint, after the runs it would have saved."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ConfigurationError(
            f"{kind} name {name!r} must be non-empty, not '.' or '..', and hold no '/' or NUL"
        )
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ConfigurationError(f"{kind} name {name!r} is not valid Unicode text") from None
    if size > MAX_NAME_BYTES:
        raise ConfigurationError(
            f"{kind} name {name[:32]!r}... is {size} bytes in UTF-8; at most {MAX_NAME_BYTES}, "
            "as it names files in the state directories"
        )


def load_app(import_string: str) -> App:
    """Import `package.module:attribute` and return the App it names.

    The current directory is put first on sys.path, as uvicorn does, so a user's own module works
    without being installed.
    """
    module_name, sep, attribute = import_string.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"model definition {import_string!r} must look like 'package.module:attribute'"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"cannot import module {module_name!r} (from {import_string!r}; looked in {cwd} "
                "and the installed packages)"
            ) from exc
        raise
    try:
        app: object = module
        for part in attribute.split("."):
            app = getattr(app, part)
    except AttributeError as exc:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from exc
    if not isinstance(app, App):
        raise ConfigurationError(f"{import_string!r} is a {type(app).__name__}, not a shared.App")
    return app
