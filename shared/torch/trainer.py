"""PAMIQ-Core's TorchTrainer: optimizers rebuilt every run, their states kept across syncs.

A local sync swaps the training module for another object, so an optimizer built once would
point at the wrong parameters after it. The trainer therefore builds its optimizers and LR
schedulers again at every `setup()`, against the current modules, and loads the states it kept
at the previous `teardown()` (optimizer states are keyed by parameter index, not identity).
"""

from __future__ import annotations

from abc import abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar, overload

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from shared.torch.model import TorchTrainingModel
from shared.torch.state_io import load_tree, save_tree
from shared.trainer.base import Trainer

StateDict = dict[str, Any]
OptimizersDict = dict[str, Optimizer]
LRSchedulersDict = dict[str, LRScheduler]
OptimizersSetup = OptimizersDict | tuple[OptimizersDict, LRSchedulersDict]

M = TypeVar("M", bound=nn.Module)

OPTIM_SUFFIX = ".optim.safetensors"
LRSCH_SUFFIX = ".lrsch.safetensors"


class TorchTrainer(Trainer):
    """A trainer of torch models; implement `create_optimizers` and `train`.

    Constructed as `Trainer` (when a run trains). The four attributes below start empty, each
    instance with its own.
    """

    @cached_property
    def optimizers(self) -> OptimizersDict:
        """This run's optimizers by name (built at `setup()`)."""
        return {}

    @cached_property
    def lr_schedulers(self) -> LRSchedulersDict:
        """This run's LR schedulers by name (built at `setup()`)."""
        return {}

    @cached_property
    def optimizer_states(self) -> dict[str, StateDict]:
        """The optimizer states kept at the last `teardown()` or loaded."""
        return {}

    @cached_property
    def lr_scheduler_states(self) -> dict[str, StateDict]:
        """The LR scheduler states kept at the last `teardown()` or loaded."""
        return {}

    @overload
    def get_torch_training_model(self, name: str) -> TorchTrainingModel[nn.Module]: ...

    @overload
    def get_torch_training_model(self, name: str, module_cls: type[M]) -> TorchTrainingModel[M]: ...

    def get_torch_training_model(
        self, name: str, module_cls: type[nn.Module] = nn.Module
    ) -> TorchTrainingModel[Any]:
        """The torch training model `name`, synced after every run (as `get_training_model`).

        Args:
            name: The model's name.
            module_cls: The class its module must be an instance of.

        Returns:
            The training model.

        Raises:
            TypeError: The model is not a TorchTrainingModel, or its module is not a
                `module_cls`.
        """
        model = self.get_training_model(name)
        if not isinstance(model, TorchTrainingModel):
            raise TypeError(f"Model {name} is not a instance of TorchTrainingModel")
        if not isinstance(model.model, module_cls):
            raise TypeError(f"Internal model is not a instance of {module_cls.__name__}")
        return model

    @abstractmethod
    def create_optimizers(self) -> OptimizersSetup:
        """Build this run's optimizers (and LR schedulers) over the current modules.

        Called at every `setup()`: read `.model` of the training models here, never cache it.

        Returns:
            Optimizers by name, or a tuple of optimizers by name and LR schedulers by name.
        """

    @override
    def setup(self) -> None:
        """Build the optimizers and schedulers, then load the states kept from the last run.

        Raises:
            KeyError: A kept state names an optimizer or scheduler that `create_optimizers`
                no longer returns.
        """
        super().setup()
        created = self.create_optimizers()
        optimizers, schedulers = created if isinstance(created, tuple) else (created, {})
        self.optimizers = dict(optimizers)
        self.lr_schedulers = dict(schedulers)
        for kind, states, targets in (
            ("optimizer", self.optimizer_states, self.optimizers),
            ("LR scheduler", self.lr_scheduler_states, self.lr_schedulers),
        ):
            for name, state in states.items():
                if name not in targets:
                    raise KeyError(
                        f"there is a kept {kind} state named {name!r} but create_optimizers "
                        f"returned no {kind} of that name (it returned {sorted(targets)})"
                    )
                targets[name].load_state_dict(state)

    @override
    def teardown(self) -> None:
        """Keep the optimizer and scheduler states for the next run."""
        super().teardown()
        self.optimizer_states = {k: o.state_dict().copy() for k, o in self.optimizers.items()}
        self.lr_scheduler_states = {k: s.state_dict().copy() for k, s in self.lr_schedulers.items()}

    @override
    def save_state(self, path: Path) -> None:
        """Save the kept states as `path/<name>.optim.safetensors` and `<name>.lrsch.safetensors`.

        Args:
            path: The trainer's state directory (created if missing).
        """
        super().save_state(path)
        for name, state in self.optimizer_states.items():
            save_tree(path / f"{name}{OPTIM_SUFFIX}", state)
        for name, state in self.lr_scheduler_states.items():
            save_tree(path / f"{name}{LRSCH_SUFFIX}", state)

    @override
    def load_state(self, path: Path) -> None:
        """Load the states `save_state` saved; the next `setup()` applies them.

        Args:
            path: The trainer's state directory.

        Raises:
            ValueError: `path` is not a directory.
        """
        if not path.is_dir():
            raise ValueError(f"Path {path} is not a directory or does not exist")
        super().load_state(path)
        for file in path.glob(f"*{OPTIM_SUFFIX}"):
            self.optimizer_states[file.name.removesuffix(OPTIM_SUFFIX)] = load_tree(file)
        for file in path.glob(f"*{LRSCH_SUFFIX}"):
            self.lr_scheduler_states[file.name.removesuffix(LRSCH_SUFFIX)] = load_tree(file)
