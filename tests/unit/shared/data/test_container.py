"""PAMIQ-Core's DataUsersDict and DataCollectorsDict (tests/pamiq_core/data/test_container.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.data import DataCollector, DataCollectorsDict, DataUser, DataUsersDict
from shared.data import SequentialBuffer as Seq
from tests.unit.shared.data.helpers import ListBuffer


@pytest.fixture
def buffers() -> dict[str, ListBuffer[int]]:
    return {"main": ListBuffer[int](100), "sub": ListBuffer[int](100)}


def test_from_data_buffers_mapping(buffers: dict[str, ListBuffer[int]]) -> None:
    users = DataUsersDict.from_data_buffers(buffers)
    assert set(users) == {"main", "sub"}
    assert all(isinstance(v, DataUser) for v in users.values())
    assert users["main"].buffer is buffers["main"]


def test_from_data_buffers_keywords_and_both(buffers: dict[str, ListBuffer[int]]) -> None:
    assert set(DataUsersDict.from_data_buffers(**buffers)) == {"main", "sub"}
    mixed = DataUsersDict.from_data_buffers(buffers, extra=ListBuffer[int](100))
    assert set(mixed) == {"main", "sub", "extra"}


def test_each_user_brings_its_collector(buffers: dict[str, ListBuffer[int]]) -> None:
    users = DataUsersDict.from_data_buffers(buffers)
    collectors = users.data_collectors_dict
    assert collectors is users.data_collectors_dict
    assert isinstance(collectors, DataCollectorsDict)
    assert set(collectors) == {"main", "sub"}
    assert all(isinstance(c, DataCollector) for c in collectors.values())
    collectors["main"].collect(7)
    assert users["main"].get_data() == [7]
    assert users["sub"].get_data() == []
    users["late"] = DataUser(ListBuffer[int](3))
    assert "late" in users.data_collectors_dict


def test_acquire_hands_each_collector_out_once(buffers: dict[str, ListBuffer[int]]) -> None:
    collectors = DataUsersDict.from_data_buffers(buffers).data_collectors_dict
    collector = collectors.acquire("main")
    assert collector is collectors["main"]
    with pytest.raises(KeyError, match="'main' is already acquired"):
        collectors.acquire("main")
    with pytest.raises(KeyError, match="'unknown' not found"):
        collectors.acquire("unknown")
    assert collectors.acquire("sub") is collectors["sub"]


def test_save_and_load_state(tmp_path: Path) -> None:
    users = DataUsersDict.from_data_buffers(a=Seq[torch.Tensor](4), b=Seq[torch.Tensor](4))
    users.data_collectors_dict["a"].collect(torch.tensor(1))
    users.data_collectors_dict["b"].collect(torch.tensor(2))
    users.save_state(tmp_path / "data")
    users.save_state(tmp_path / "data")  # the trainer saves again into the same place
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a", "b"]
    restored = DataUsersDict.from_data_buffers(a=Seq[torch.Tensor](4), b=Seq[torch.Tensor](4))
    restored.load_state(tmp_path / "data")
    assert [t.item() for t in restored["a"].get_data()] == [1]
    assert [t.item() for t in restored["b"].get_data()] == [2]
