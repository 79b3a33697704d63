"""The app's experience buffers, built on the trainer: a data user for each, and its schema.

A process that runs every trainer of the app holds every buffer. One that runs a trainer group
(replicas split the groups between them) holds only the buffers its own trainers read: those
they look up with `get_data_user` when their data users are attached (PAMIQ's
`on_data_users_attached`), and those their training condition names. So the experience for a
buffer goes to the replica holding the group that reads it, and agents find that replica by
asking (experience.v1 ListBuffers lists what a trainer holds). A buffer read by trainers of two
groups would be held by both groups' replicas while an agent streams to one of them: the other
group would never see a sample: such groups are refused at start (trainer_service/groups.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from typing_extensions import override

from shared.app import App
from shared.data.batch import BatchSchema
from shared.data.container import DataUsersDict
from shared.data.interface import DataUser
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
