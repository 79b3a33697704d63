"""PAMIQ-Core's TorchTrainer: optimizers rebuilt every run, their state kept across syncs."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, TypeVar

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
    """A trainer of torch models: `create_optimizers` runs at every setup, against the current
    modules, and the optimizer and scheduler states carry over from the previous run."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizers: OptimizersDict = {}
        self.lr_schedulers: LRSchedulersDict = {}
        self.optimizer_states: dict[str, StateDict] = {}
        self.lr_scheduler_states: dict[str, StateDict] = {}

    def get_torch_training_model(
        self,
        name: str,
        module_cls: type[M] = nn.Module,  # type: ignore[assignment]
    ) -> TorchTrainingModel[M]:
        model = self.get_training_model(name)
        if not isinstance(model, TorchTrainingModel):
            raise TypeError(f"Model {name} is not a instance of TorchTrainingModel")
        if not isinstance(model.model, module_cls):
            raise TypeError(f"Internal model is not a instance of {module_cls.__name__}")
        return model

    @abstractmethod
    def create_optimizers(self) -> OptimizersSetup:
        """The optimizers (and optionally LR schedulers) for this run, by name."""

    @override
    def setup(self) -> None:
        super().setup()
        setup = self.create_optimizers()
        optimizers, schedulers = setup if isinstance(setup, tuple) else (setup, {})
        self.optimizers = dict(optimizers)
        self.lr_schedulers = dict(schedulers)
        for name, state in self.optimizer_states.items():
            if name in self.optimizers:
                self.optimizers[name].load_state_dict(state)
        for name, state in self.lr_scheduler_states.items():
            if name in self.lr_schedulers:
                self.lr_schedulers[name].load_state_dict(state)

    @override
    def teardown(self) -> None:
        super().teardown()
        self.optimizer_states = {k: o.state_dict().copy() for k, o in self.optimizers.items()}
        self.lr_scheduler_states = {k: s.state_dict().copy() for k, s in self.lr_schedulers.items()}

    @override
    def save_state(self, path: Path) -> None:
        super().save_state(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, state in self.optimizer_states.items():
            save_tree(path / f"{name}{OPTIM_SUFFIX}", state)
        for name, state in self.lr_scheduler_states.items():
            save_tree(path / f"{name}{LRSCH_SUFFIX}", state)

    @override
    def load_state(self, path: Path) -> None:
        super().load_state(path)
        if not path.is_dir():
            raise ValueError(f"Path {path} is not a directory or does not exist")
        self.optimizer_states = {
            p.name.removesuffix(OPTIM_SUFFIX): load_tree(p) for p in path.glob(f"*{OPTIM_SUFFIX}")
        }
        self.lr_scheduler_states = {
            p.name.removesuffix(LRSCH_SUFFIX): load_tree(p) for p in path.glob(f"*{LRSCH_SUFFIX}")
        }
