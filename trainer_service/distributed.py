"""Data-parallel training in the trainer tier: several ranks train one set of models; rank 0 syncs.

Launch the trainer service under torchrun (or anything that sets RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT, as torch.distributed's env:// rendezvous expects):

    torchrun --nnodes 1 --nproc-per-node 4 -m trainer_service --models my_app:app ...

Every rank builds the same models, resumes from the same checkpoint (a --state-dir they share)
and runs the same trainers in the same order, each on its own data. After the resume, rank 0's
weights are broadcast to the others; during training each parameter's gradient is averaged
across ranks as soon as backward has accumulated it, so every optimizer takes the same step and
the weights stay bit-identical, which the ranks check against each other at every checkpoint;
buffers (BatchNorm's running statistics, each rank's own after a run) are rank 0's again after
every run. Ranks that built other models or trainers are refused before the first broadcast.
Only rank 0 pushes to the inference services, holds the writer lease, serves metrics and writes
checkpoints. The ranks agree at every run boundary on whether to stop, so a signal that reaches
one rank first never leaves the others waiting in a collective; after every sync rank 0 tells
the others how it went, so a fenced writer stops every rank at once (exit code 3), and a sync
that failed is treated alike everywhere (each rank's trainer tears its run down all the same).

A trainer must make the same run-or-skip decision on every rank (`is_trainable`), or the ranks
wait on each other forever; gloo is used on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Imported here, before any group is joined, for its side effect: its functions take
# `group=group.WORLD` as a default argument, read on first import. torch.optim imports it
# (through torch._dynamo) with the first optimizer; imported after the group is joined, those
# defaults would hold the group past destroy_process_group() and its threads into exit.
import torch.distributed.nn.functional
import xxhash
from torch import nn

from shared.errors import ConfigurationError
from shared.weights.digest import state_digest

logger = logging.getLogger(__name__)


class RanksDivergedError(RuntimeError):
    """The ranks' weights differ: a trainer did something on one rank it did not on the others."""


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone pushes, checkpoints and holds the writer lease."""
        return self.rank == 0

    def check_same_models(self, layout: Iterable[tuple[str, ...]]) -> None:
        """Raise ConfigurationError unless every rank built the same models and trainers
        (`layout`: names, shapes and dtypes): ranks of different apps would wait on each other
        in the first broadcast that one of them does not make, for good."""
        differing = self._differing(xxhash.xxh3_128_digest(repr(sorted(layout)).encode()))
        if differing:
            raise ConfigurationError(
                f"rank(s) {differing} built other models or trainers than rank 0 (names, shapes "
                "or dtypes differ): every rank must run the same app, with the same --trainers"
            )

    def share_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics, each rank's own
        after a run on its own data), as DDP's `broadcast_buffers` does: rank 0 pushed its own,
        and the ranks' checkpoints must agree."""
        for module in modules:
            for tensor in module.buffers():
                dist.broadcast(tensor.data, src=0)

    def replicate(self, modules: Iterable[nn.Module]) -> None:
        """Give every rank rank 0's weights, then average each gradient across ranks."""
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                dist.broadcast(tensor.data, src=0)
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.register_post_accumulate_grad_hook(self._average_grad)  # type: ignore[no-untyped-call]

    def _average_grad(self, parameter: torch.Tensor) -> None:
        # One all-reduce per parameter, in backward's order (the same on every rank). DDP's
        # bucketing overlaps better, but it wraps the module and renames its state dict, which
        # the sync and the checkpoints must keep as the user wrote it.
        assert parameter.grad is not None
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(self.world_size)

    def agree_to_stop(self, stopping: bool) -> bool:
        """True on every rank as soon as any rank wants to stop."""
        flag = torch.tensor([int(stopping)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def rank_zero_says(self, value: int) -> int:
        """Rank 0's `value`, on every rank: what only rank 0 knows (how its sync went), so
        that every rank acts on it together."""
        said = torch.tensor([value], device=self.device)
        dist.broadcast(said, src=0)
        return int(said.item())

    def check_in_sync(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Raise RanksDivergedError unless every rank holds bit-identical weights."""
        for name in sorted(states):
            differing = self._differing(state_digest(states[name]))
            if differing:
                raise RanksDivergedError(
                    f"model {name!r}: rank(s) {differing} hold weights that differ from rank 0's"
                )
        logger.info("rank %d: all %d ranks hold identical weights", self.rank, self.world_size)

    def _differing(self, digest: bytes) -> list[int]:
        """The ranks whose `digest` is not rank 0's (a collective: every rank calls it)."""
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return [r for r, d in enumerate(gathered) if not torch.equal(d, gathered[0])]

    def finish(self) -> None:
        """Wait until every rank is done (rank 0 writes the last checkpoint alone) before any
        tears the group down."""
        dist.barrier()

    def close(self) -> None:
        """Leave the group and free it now, joining gloo's threads while the interpreter is
        whole. A group that outlives destroy_process_group() (something still references it)
        keeps its threads running into interpreter exit, where ranks were seen to abort
        ("terminate called without an active exception") after a clean run."""
        world = dist.group.WORLD
        dist.destroy_process_group()
        # Two references: `world` and getrefcount's argument. Any more and `del` frees nothing.
        if sys.getrefcount(world) > 2:
            logger.warning(
                "rank %d: the process group is still referenced after it was destroyed; its "
                "threads stay up until exit, which can abort this rank. A module that reads "
                "torch.distributed.group.WORLD at import time, imported after the group was "
                "joined, holds it: import such modules before the group is joined",
                self.rank,
            )
        del world
        logger.info("rank %d: left the process group", self.rank)


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: under torchrun on CUDA, `cuda:LOCAL_RANK`, made current
    (before anything, the app's imports included, can touch cuda:0 from every rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or device.type != "cuda":
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def join(device: torch.device) -> Group | None:
    """Join the process group torchrun describes in the environment; None when run alone.

    `device` is the rank's own (see rank_device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = Group(dist.get_rank(), dist.get_world_size(), device)
    logger.info("rank %d of %d (%s) on %s", group.rank, world_size, dist.get_backend(), device)
    return group
