"""WriterLease: grants, the fencing check, and the writer.json it keeps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from inference_service.lease import COUNTER_LIMIT, WriterLease, check_counter
from shared.errors import (
    ConfigurationError,
    FencedError,
    OutOfRangeError,
    UnavailableError,
    UnknownEpochError,
)


def on_disk(folder: Path) -> object:
    return json.loads((folder / "writer.json").read_text())


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".writer.json.*"))


def test_each_grant_is_the_next_epoch_and_only_the_current_one_may_push() -> None:
    lease = WriterLease("m")
    lease.check(0, "anyone")  # nobody has acquired the model: pushes without a lease pass
    assert lease.grant("a") == 1
    assert lease.grant("b") == 2
    assert lease.snapshot() == (2, "b") and (lease.epoch, lease.holder) == (2, "b")
    lease.check(2, "b")
    with pytest.raises(FencedError, match=r"'m' is written by 'b' \(epoch 2\); this push from 'a'"):
        lease.check(1, "a")
    with pytest.raises(FencedError, match="carries epoch 0 and is fenced"):
        lease.check(0, "anyone")
    with pytest.raises(UnknownEpochError, match=r"carries epoch 3, newer than the newest granted"):
        lease.check(3, "c")
    assert lease.snapshot() == (2, "b")  # checking never moves the lease


def test_a_block_under_the_lease_runs_only_for_the_current_epoch() -> None:
    lease = WriterLease("m")
    lease.grant("a")
    ran: list[str] = []
    with lease.fenced(1, "a"):
        ran.append("current")
    lease.grant("b")
    with pytest.raises(FencedError), lease.fenced(1, "a"):
        ran.append("fenced")
    assert ran == ["current"]


def test_grants_are_recorded_before_they_are_answered_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "models" / "m"
    lease = WriterLease("m")
    lease.attach(folder)  # no file yet: nobody has acquired the model
    assert lease.snapshot() == (0, "")
    assert lease.grant("a") == 1
    assert on_disk(folder) == {"epoch": 1, "holder": "a"}
    assert lease.grant("b") == 2
    assert on_disk(folder) == {"epoch": 2, "holder": "b"}
    assert temp_files(folder) == []
    again = WriterLease("m")
    again.attach(folder)
    assert again.snapshot() == (2, "b")
    with pytest.raises(FencedError):
        again.check(1, "a")  # fenced before the restart, fenced after it
    assert again.grant("c") == 3


def test_concurrent_grants_get_one_epoch_each_and_the_file_holds_the_last(tmp_path: Path) -> None:
    lease = WriterLease("m")
    lease.attach(tmp_path)
    start = threading.Barrier(50)
    answers: dict[str, int] = {}

    def grant(writer: str) -> None:
        start.wait(10)
        answers[writer] = lease.grant(writer)

    threads = [threading.Thread(target=grant, args=(f"w{i}",)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers.values()) == list(range(1, 51))
    last = next(writer for writer, epoch in answers.items() if epoch == 50)
    assert lease.snapshot() == (50, last)
    assert on_disk(tmp_path) == {"epoch": 50, "holder": last}
    assert temp_files(tmp_path) == []


def test_a_grant_the_disk_refuses_is_unavailable_and_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    lease = WriterLease("m")
    lease.attach(folder)
    lease.grant("a")
    folder.rename(tmp_path / "away")
    folder.write_text("a file where the folder was")  # refuses writes, even to root
    with pytest.raises(UnavailableError, match=r"the writer is still 'a' \(epoch 1\)"):
        lease.grant("b")
    assert lease.snapshot() == (1, "a")
    lease.check(1, "a")
    folder.unlink()
    (tmp_path / "away").rename(folder)
    assert lease.grant("b") == 2
    assert on_disk(folder) == {"epoch": 2, "holder": "b"}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"epoch": "3", "holder": "a"}', 'it must hold {"epoch": <integer>'),
        ('{"epoch": true, "holder": "a"}', 'it must hold {"epoch": <integer>'),
        ('{"epoch": 3}', 'it must hold {"epoch": <integer>'),
        ('{"epoch": -1, "holder": "a"}', "epoch -1 is out of range"),
        (json.dumps({"epoch": 1 << 64, "holder": "a"}), f"epoch {1 << 64} is out of range"),
        (json.dumps({"epoch": 1 << 63, "holder": "a"}), f"epoch {1 << 63} is out of range"),
    ],
)
def test_a_lease_file_that_holds_no_valid_lease_is_refused_at_start(
    tmp_path: Path, content: str, problem: str
) -> None:
    (tmp_path / "writer.json").write_text(content)
    lease = WriterLease("m")
    with pytest.raises(ConfigurationError, match=rf"writer.json: {problem}") as caught:
        lease.attach(tmp_path)
    assert "would let writers fenced before the restart push again" in str(caught.value)
    assert lease.snapshot() == (0, "")


def test_the_epoch_never_goes_past_the_bound(tmp_path: Path) -> None:
    (tmp_path / "writer.json").write_text(json.dumps({"epoch": COUNTER_LIMIT - 1, "holder": "a"}))
    lease = WriterLease("m")
    lease.attach(tmp_path)
    assert lease.snapshot() == (COUNTER_LIMIT - 1, "a")
    with pytest.raises(OutOfRangeError, match="cannot go past 9223372036854775807"):
        lease.grant("b")
    assert lease.snapshot() == (COUNTER_LIMIT - 1, "a")
    assert on_disk(tmp_path) == {"epoch": COUNTER_LIMIT - 1, "holder": "a"}


def test_counters_are_checked_against_the_bound() -> None:
    check_counter("version", 0)
    check_counter("version", COUNTER_LIMIT - 1)
    with pytest.raises(OutOfRangeError, match="version 9223372036854775808 is out of range"):
        check_counter("version", COUNTER_LIMIT)
    with pytest.raises(OutOfRangeError, match="writer_epoch -1 is out of range"):
        check_counter("writer_epoch", -1)
