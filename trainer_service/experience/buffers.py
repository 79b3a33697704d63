"""The app's experience buffers, built on the trainer: a data user for each, and its schema.

A process that runs every trainer of the app holds every buffer. One that runs a trainer group
(replicas split the groups between them) holds only the buffers its own trainers read: those
they look up with `get_data_user` when their data users are attached (PAMIQ's
`on_data_users_attached`), and those their training condition names. So the experience for a
buffer goes to the replica holding the group that reads it, and agents find that replica by
asking (experience.v1 ListBuffers lists what a trainer holds). A buffer read by trainers of two
groups would be held by both groups' replicas while an agent streams to one of them: the other
group would never see a sample: such groups are refused at start (trainer_service/groups.py).

A buffer resumed from a checkpoint is checked against what the app now declares it holds: an
app whose buffer changed its tensors (a shape, a dtype, a name) since the checkpoint was
written would otherwise hand its trainer old samples beside new ones of another layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from shared.app import App
from shared.data.batch import BatchSchema, Column
from shared.data.container import DataUsersDict
from shared.data.interface import DataUser
from shared.dtypes import BY_OIP, BY_TORCH
from shared.errors import ConfigurationError
from shared.trainer.base import TrainersDict


@dataclass(frozen=True)
class Buffers:
    """The data users by name (what trainers read) and what each buffer's samples hold."""

    users: DataUsersDict
    schemas: Mapping[str, BatchSchema]

    @classmethod
    def of(cls, app: App) -> Buffers:
        """Build every buffer the app declares.

        Raises:
            ConfigurationError: A buffer's queue is unbounded: fed over the network, it would
                grow without limit whenever the trainer falls behind.
        """
        users = DataUsersDict()
        schemas = {}
        for spec in app.buffers.values():
            buffer = spec.build()
            if buffer.max_queue_size is None:
                raise ConfigurationError(
                    f"buffer {spec.name!r} has no max_queue_size: give it a bounded queue "
                    "(SequentialBuffer and RandomReplacementBuffer have one)"
                )
            users[spec.name] = DataUser(buffer)
            schemas[spec.name] = BatchSchema.of(spec.name, spec.tensors)
        return cls(users, schemas)

    def load_state(self, path: Path) -> None:
        """Resume each buffer saved under `path` (a checkpoint's `data/`) and check that the
        samples resumed are what the app declares the buffer holds.

        Raises:
            ConfigurationError: A buffer resumed samples it no longer holds (the app changed
                its tensors since the checkpoint), naming the buffer and the tensor.
        """
        for name, user in self.users.items():
            if (path / name).is_dir():
                user.load_state(path / name)
                check_resumed(self.schemas[name], user.buffer, path / name)

    def attach(self, trainers: TrainersDict, every: bool = True) -> Buffers:
        """Attach the data users to every trainer; return the buffers this process holds:
        all of them when it runs `every` trainer of the app, else those its trainers read.

        Raises:
            ConfigurationError: A trainer trains on the condition of a buffer the app does
                not declare.
        """
        read = self.read_by(trainers)
        if every:
            return self
        users = DataUsersDict({n: u for n, u in self.users.items() if n in read})
        return Buffers(users, {n: s for n, s in self.schemas.items() if n in read})

    def read_by(self, trainers: TrainersDict) -> set[str]:
        """Attach the data users to every trainer; the buffers they read."""
        read: set[str] = set()
        for name, trainer in trainers.items():
            wanted = trainer.training_condition_data_user
            if wanted is not None and wanted not in self.users:
                known = ", ".join(sorted(self.users)) or "none"
                raise ConfigurationError(
                    f"trainer {name!r} trains when buffer {wanted!r} has data, but the app "
                    f"declares no such buffer (it declares: {known})"
                )
            view = _Reads(self.users)
            trainer.attach_data_users(view)
            read |= view.read | ({wanted} if wanted is not None else set())
        return read


class _Reads(DataUsersDict):
    """The data users as one trainer sees them, noting the names it looks up."""

    def __init__(self, users: DataUsersDict) -> None:
        super().__init__(users)
        self.read: set[str] = set()

    @override
    def __getitem__(self, key: str) -> DataUser[Any]:
        self.read.add(key)
        return super().__getitem__(key)


def check_resumed(schema: BatchSchema, buffer: Any, saved: Path) -> None:
    """Check what `buffer` resumed from `saved` (its `get_data()`) against `schema`. Data that
    is not samples of named tensors (a buffer of the app's own making) is not checked.

    Raises:
        ConfigurationError: A sample lacks a tensor the buffer holds, holds another, or holds
            one of another dtype or shape than the buffer's.
    """
    lead = (
        f"buffer {schema.buffer!r} resumed {len(buffer)} samples from {saved} that it no "
        "longer holds (the app changed its tensors since that checkpoint was written)"
    )
    fix = f"; move {saved} away to start the buffer empty, or declare it as it was"
    try:
        columns = _columns(buffer.get_data())
    except KeyError as exc:  # a dict buffer given a sample of a name it has no list for
        raise ConfigurationError(
            f"{lead}: they hold tensor {exc.args[0]!r}, the buffer holds "
            f"{', '.join(schema.names)}{fix}"
        ) from None
    if not columns:
        return
    count = max(len(tensors) for tensors in columns.values())
    if not count:  # saved empty (no sample had arrived): nothing it holds can differ
        return
    held = [name for name, tensors in columns.items() if tensors]
    if sorted(held) != sorted(schema.names) or any(len(columns[n]) != count for n in held):
        raise ConfigurationError(
            f"{lead}: they hold {', '.join(sorted(held))}, the buffer holds "
            f"{', '.join(schema.names)}{fix}"
        )
    for column in schema.columns:
        found = Counter((t.dtype, tuple(t.shape)) for t in columns[column.name])
        for (dtype, shape), times in found.items():
            if dtype != BY_OIP[column.datatype].torch_dtype or not column.fits(shape):
                raise ConfigurationError(
                    f"{lead}: tensor {column.name!r} is {_describe(dtype, shape)} in {times} "
                    f"of them, the buffer holds {_declared(column)}{fix}"
                )


def _columns(data: object) -> dict[str, list[torch.Tensor]] | None:
    """`get_data()`'s samples as a list of tensors per name, or None if they are not samples
    of named tensors: a dict buffer's lists per name, or a list of mappings."""
    if isinstance(data, Mapping):
        columns = {str(k): list(v) for k, v in data.items() if isinstance(v, Sequence)}
        if len(columns) != len(data):
            return None
    elif isinstance(data, Sequence) and all(isinstance(s, Mapping) for s in data):
        columns = {}
        for sample in data:
            for name, tensor in sample.items():
                columns.setdefault(str(name), []).append(tensor)
    else:
        return None
    tensors = all(isinstance(t, torch.Tensor) for c in columns.values() for t in c)
    return columns if tensors else None


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    known = BY_TORCH.get(dtype)
    name = known.oip if known is not None and known.oip is not None else str(dtype)
    return f"{name} {list(shape)}"


def _declared(column: Column) -> str:
    return f"{column.datatype} {list(column.shape)}"
