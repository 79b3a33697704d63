"""PAMIQ-Core's DataUsersDict (buffers by name, for trainers) and DataCollectorsDict (their
writing ends, for whoever collects)."""

from __future__ import annotations

from collections import UserDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from typing_extensions import override

from shared.data.buffer import DataBuffer
from shared.data.interface import DataCollector, DataUser
from shared.state import PersistentStateMixin


class DataCollectorsDict(UserDict[str, DataCollector[Any]]):
    """Collectors by name; `acquire` hands each out once."""

    def __init__(self, *args: Any, **kwds: Any) -> None:
        super().__init__(*args, **kwds)
        self._acquired_collectors: set[str] = set()

    def acquire(self, collector_name: str) -> DataCollector[Any]:
        """The collector `collector_name`, for one user alone.

        Raises:
            KeyError: It was acquired already, or there is none of that name.
        """
        if collector_name in self._acquired_collectors:
            raise KeyError(f"Data collector '{collector_name}' is already acquired.")
        if collector_name not in self:
            raise KeyError(f"Data collector '{collector_name}' not found.")
        self._acquired_collectors.add(collector_name)
        return self[collector_name]


class DataUsersDict(UserDict[str, DataUser[Any]], PersistentStateMixin):
    """Data users by name; adding one registers its collector in `data_collectors_dict`."""

    def __init__(self, *args: Any, **kwds: Any) -> None:
        self._data_collectors_dict = DataCollectorsDict()
        super().__init__(*args, **kwds)

    @property
    def data_collectors_dict(self) -> DataCollectorsDict:
        """The collectors of these users, under the same names (the same object each time)."""
        return self._data_collectors_dict

    @override
    def __setitem__(self, key: str, item: DataUser[Any]) -> None:
        super().__setitem__(key, item)
        self._data_collectors_dict[key] = item._collector

    @classmethod
    def from_data_buffers(
        cls,
        buffer_map: Mapping[str, DataBuffer[Any, Any]] | None = None,
        /,
        **kwds: DataBuffer[Any, Any],
    ) -> Self:
        """A DataUser for each buffer, under the buffer's name.

        Args:
            buffer_map: Buffers by name.
            **kwds: More buffers by name.
        """
        data: dict[str, DataBuffer[Any, Any]] = {}
        if buffer_map is not None:
            data.update(buffer_map)
        data.update(kwds)
        return cls({k: DataUser(buf) for k, buf in data.items()})

    @override
    def save_state(self, path: Path) -> None:
        """Save each user into `path/<name>` (`path` is created; it may exist)."""
        path.mkdir(parents=True, exist_ok=True)
        for name, user in self.items():
            user.save_state(path / name)

    @override
    def load_state(self, path: Path) -> None:
        """Load each user from `path/<name>`."""
        for name, user in self.items():
            user.load_state(path / name)
