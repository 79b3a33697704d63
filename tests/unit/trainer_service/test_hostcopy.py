"""The host copy a lagging target is caught up from (trainer_service/hostcopy.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from trainer_service.hostcopy import LATE, LATE_BY_S, RECENT, HostCopy, UsualSyncs


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_copy_keeps_the_published_values_after_the_caller_writes_again(
    pool: ThreadPoolExecutor,
) -> None:
    weight = torch.arange(8, dtype=torch.float32, requires_grad=True)
    served = torch.arange(8, dtype=torch.bfloat16)  # made for the push: owned
    with HostCopy(pool, {"w": weight, "s": served}, ("s",)) as copy:
        copy.start()
        copied = copy.result()
    with torch.no_grad():
        weight.add_(1)  # the next training step
    assert torch.equal(copied["w"], torch.arange(8, dtype=torch.float32))
    assert not copied["w"].requires_grad
    assert copied["s"].data_ptr() == served.data_ptr()  # owned: kept, not copied


def test_a_copy_due_after_a_time_begins_then_and_is_the_one_returned(
    pool: ThreadPoolExecutor,
) -> None:
    weight = torch.ones(4)
    with HostCopy(pool, {"w": weight}, ()) as copy:
        copy.start_after(0.01)
        wait_until(lambda: copy.started)
        copied = copy.result()
    assert torch.equal(copied["w"], torch.ones(4))
    assert copied["w"].data_ptr() != weight.data_ptr()


def test_a_copy_asked_for_without_being_begun_is_made_then(pool: ThreadPoolExecutor) -> None:
    with HostCopy(pool, {"w": torch.zeros(2)}, ()) as copy:
        copy.start_after(3600)
        assert not copy.started
        assert torch.equal(copy.result()["w"], torch.zeros(2))


def test_nothing_begins_once_the_sync_has_ended(pool: ThreadPoolExecutor) -> None:
    with HostCopy(pool, {"w": torch.zeros(2)}, ()) as copy:
        pass
    copy.start()  # a timer firing after the sync returned
    assert not copy.started


def test_a_sync_is_late_past_a_multiple_of_the_quickest_recent_one() -> None:
    usual = UsualSyncs()
    assert usual.late_after("m") is None  # nothing measured: never late
    usual.record("m", 5.0)  # the first sync: connections opened, everything whole
    assert usual.late_after("m") == pytest.approx(LATE * 5.0)
    usual.record("m", 2.0)
    usual.record("m", 3.0)
    assert usual.late_after("m") == pytest.approx(LATE * 2.0)
    for _ in range(RECENT):
        usual.record("m", 4.0)  # the host got slower: the quick ones are forgotten
    assert usual.late_after("m") == pytest.approx(LATE * 4.0)
    assert usual.late_after("other") is None


def test_a_short_sync_is_late_only_a_fixed_time_past_its_usual_one() -> None:
    usual = UsualSyncs()
    usual.record("m", 0.2)  # pushes on a fast link: a slow one is not yet a late one
    assert usual.late_after("m") == pytest.approx(0.2 + LATE_BY_S)
