from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from shared.cli import name_groups
from shared.errors import ConfigurationError
from shared.statedir import claim, claim_first


def test_slots_give_each_claimant_its_own_directory_and_a_freed_one_comes_back(
    tmp_path: Path,
) -> None:
    template = tmp_path / "replica-{slot}"
    first, second = claim(template), claim(template)
    assert first is not None and second is not None
    assert (first.path.name, second.path.name) == ("replica-0", "replica-1")
    first.release()
    again = claim(template)
    assert again is not None and again.path.name == "replica-0"


def test_a_held_directory_is_refused_naming_its_holder(tmp_path: Path) -> None:
    held = claim(tmp_path / "state")
    assert held is not None
    with pytest.raises(ConfigurationError, match=r"in use by another process \(pid \d+"):
        claim(tmp_path / "state")


def test_a_waiting_claimant_takes_over_when_the_holder_lets_go(tmp_path: Path) -> None:
    held = claim(tmp_path / "state")
    assert held is not None
    stop = threading.Event()
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(claim(tmp_path / "state", wait=stop)))
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive()  # standing by
    held.release()
    waiter.join(5)
    assert not waiter.is_alive() and result and result[0] is not None


def test_a_stopped_wait_returns_none(tmp_path: Path) -> None:
    held = claim(tmp_path / "state")
    assert held is not None
    stop = threading.Event()
    stop.set()
    assert claim(tmp_path / "state", wait=stop) is None


def test_claim_first_takes_the_first_free_group_then_stands_by_for_any(tmp_path: Path) -> None:
    candidates = [tmp_path / "sine", tmp_path / "cosine"]
    stop = threading.Event()
    first, second = claim_first(candidates, wait=stop), claim_first(candidates, wait=stop)
    assert first is not None and second is not None
    assert (first[0], second[0]) == (0, 1)
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(claim_first(candidates, wait=stop)))
    waiter.start()
    waiter.join(1.5)
    assert waiter.is_alive()  # both groups are taken: standing by
    second[1].release()
    waiter.join(5)
    assert result and isinstance(result[0], tuple) and result[0][0] == 1


def test_groups_parse() -> None:
    assert name_groups("a, b; c;") == (("a", "b"), ("c",))


def test_a_claim_knows_when_its_directory_was_removed_or_made_again(tmp_path: Path) -> None:
    held = claim(tmp_path / "state")
    assert held is not None and held.still_held()
    shutil.rmtree(tmp_path / "state")
    assert not held.still_held()
    again = claim(tmp_path / "state")  # a standby makes it again, and holds it
    assert again is not None and again.still_held() and not held.still_held()
