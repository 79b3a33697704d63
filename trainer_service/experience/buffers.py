"""The app's experience buffers, built on the trainer: a data user for each, and its schema."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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

    def attach(self, trainers: TrainersDict) -> None:
        """Attach the data users to every trainer.

        Raises:
            ConfigurationError: A trainer trains on the condition of a buffer the app does
                not declare.
        """
        for name, trainer in trainers.items():
            wanted = trainer.training_condition_data_user
            if wanted is not None and wanted not in self.users:
                known = ", ".join(sorted(self.users)) or "none"
                raise ConfigurationError(
                    f"trainer {name!r} trains when buffer {wanted!r} has data, but the app "
                    f"declares no such buffer (it declares: {known})"
                )
        trainers.attach_data_users(self.users)
