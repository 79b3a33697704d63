"""The history on disk: a slow disk never holds a push up, a failed or full disk leaves no partial
file and frees older versions, and what is written restores bit-exactly."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from inference_service import persistence
from inference_service.persistence import WeightStore, write_all
from inference_service.persister import Persister
from inference_service.served_model import ServedModel
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, PushHeader
from inference_service.syncplane.service import SyncPlane
from shared.app import ModelSpec, TensorSpec
from shared.errors import ConfigurationError, ModelNotFoundError, StoredVersionDamagedError
from shared.weights.digest import state_digest
from shared.weights.writer import Payload

SPEC = ModelSpec(
    "m",
    lambda: None,
    (TensorSpec("x", "FP32", (-1, 16)),),  # type: ignore[arg-type,return-value]
    (TensorSpec("y", "FP32", (-1, 4)),),
)
WAIT_S = 30.0  # for events that come at once when the code is right


def new_module() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def new_model() -> ServedModel:
    torch.manual_seed(0)
    return ServedModel(SPEC, new_module(), lambda m, x: m(x), True, torch.device("cpu"))


def weights(version: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(version)
    return {k: v.detach().clone() for k, v in new_module().state_dict().items()}


def push(plane: SyncPlane, version: int) -> None:
    state = weights(version)
    payload = Payload.of(list(state.items()))
    header = PushHeader("m", version, 0, "trainer-a", payload.nbytes)
    parts: Iterator[bytes | Commit] = iter([*payload.chunks(64), Commit(state_digest(state))])
    assert plane.applier.apply(header, parts).version == version


def stored(store: WeightStore) -> list[int]:
    return [v.version for v in store.versions("m")]


def temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*/.*.tmp"))


def assert_restores(root: Path, version: int) -> None:
    """A fresh service on `root` serves `version`, bit-exactly."""
    fresh = new_model()
    assert WeightStore(root).restore(fresh)
    assert fresh.live.version == version
    live = fresh.live.module.state_dict()
    for name, tensor in weights(version).items():
        assert torch.equal(live[name], tensor), name
    assert fresh.live.digest == state_digest(weights(version))


class StuckDisk:
    """A disk whose first write hangs until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, fd: int, data: bytes) -> None:
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the disk"
        write_all(fd, data)


class FullDisk:
    """A disk that takes half of a chunk and then reports `code`, `times` times."""

    def __init__(self, code: int, times: int) -> None:
        self.code = code
        self.times = times
        self.failed = threading.Event()

    def __call__(self, fd: int, data: bytes) -> None:
        if self.times > 0:
            self.times -= 1
            write_all(fd, data[: len(data) // 2])
            self.failed.set()
            raise OSError(self.code, os.strerror(self.code))
        write_all(fd, data)


@pytest.mark.parametrize(
    ("chunk_bytes", "kept"),
    [
        (1 << 20, [3, 1]),  # one chunk, copied before the pushes: version 1 is written whole
        (256, [3]),  # many: the copy finds version 1's module taken over and gives it up
    ],
)
def test_two_pushes_commit_while_a_write_is_stuck_and_the_newest_is_written_after(
    tmp_path: Path, chunk_bytes: int, kept: list[int]
) -> None:
    model = new_model()
    disk = StuckDisk()
    store = WeightStore(tmp_path, write=disk, chunk_bytes=chunk_bytes)
    persister = Persister(store, {"m": model})
    # A short drain: a push that waited on the writer would fail UNAVAILABLE, not hang.
    plane = SyncPlane({"m": model}, SyncLimits(drain_timeout_s=0.5), persister.committed)
    try:
        push(plane, 1)
        assert disk.entered.wait(WAIT_S)  # writing version 1 now, and stuck
        push(plane, 2)
        push(plane, 3)  # into the module that holds version 1, the one being written
        assert model.live.version == 3
    finally:
        disk.release.set()
        persister.close()
    assert stored(store) == kept
    assert temp_files(tmp_path) == []
    if 1 in kept:  # copied before version 3 overwrote its module: still version 1's bytes
        version_1 = next(v for v in store.versions("m") if v.version == 1)
        assert version_1.digest == state_digest(weights(1))
    assert_restores(tmp_path, 3)


def test_out_of_space_removes_all_older_versions_but_the_newest_and_tries_once_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = new_model()
    disk = FullDisk(errno.ENOSPC, times=0)
    store = WeightStore(tmp_path, write=disk, chunk_bytes=256)
    plane = SyncPlane({"m": model}, SyncLimits())
    for version in (1, 2, 3):
        push(plane, version)
        assert store.save(model) == version
    push(plane, 4)
    disk.times = 1
    with caplog.at_level(logging.WARNING, "inference_service.persistence"):
        assert store.save(model) == 4
    assert stored(store) == [4, 3]
    assert temp_files(tmp_path) == []
    assert "out of disk space writing version 4; removed versions 2, 1 to make room" in caplog.text
    assert_restores(tmp_path, 4)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_out_of_space_never_removes_the_only_complete_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    model = new_model()
    disk = FullDisk(code, times=0)
    store = WeightStore(tmp_path, write=disk, chunk_bytes=256)
    plane = SyncPlane({"m": model}, SyncLimits())
    push(plane, 1)
    assert store.save(model) == 1
    push(plane, 2)
    disk.times = 2
    with (
        caplog.at_level(logging.WARNING, "inference_service.persistence"),
        pytest.raises(OSError) as caught,
    ):
        store.save(model)
    assert caught.value.errno == code
    assert stored(store) == [1]
    assert temp_files(tmp_path) == []
    assert "the only complete version on disk (1) is kept" in caplog.text
    assert "version 2 was not written to disk" in caplog.text
    assert_restores(tmp_path, 1)


def test_a_failed_write_leaves_no_temp_file_and_removes_no_version(tmp_path: Path) -> None:
    model = new_model()
    disk = FullDisk(errno.EIO, times=0)
    store = WeightStore(tmp_path, write=disk, chunk_bytes=256)
    plane = SyncPlane({"m": model}, SyncLimits())
    for version in (1, 2):
        push(plane, version)
        assert store.save(model) == version
    push(plane, 3)
    disk.times = 1
    with pytest.raises(OSError) as caught:
        store.save(model)
    assert caught.value.errno == errno.EIO
    assert stored(store) == [2, 1]
    assert temp_files(tmp_path) == []
    assert store.save(model) == 3  # the disk is back: the same version goes through
    assert stored(store) == [3, 2, 1]


def test_the_persister_keeps_writing_after_a_failed_write(tmp_path: Path) -> None:
    model = new_model()
    disk = FullDisk(errno.EIO, times=1)
    store = WeightStore(tmp_path, write=disk, chunk_bytes=256)
    persister = Persister(store, {"m": model})
    plane = SyncPlane({"m": model}, SyncLimits(), persister.committed)
    try:
        push(plane, 1)
        assert disk.failed.wait(WAIT_S)  # version 1 did not reach the disk
        push(plane, 2)
    finally:
        persister.close()
    assert stored(store) == [2]
    assert temp_files(tmp_path) == []
    assert_restores(tmp_path, 2)


def test_a_stopping_persister_waits_for_a_hung_disk_only_so_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that hangs (a dead network mount) must not hold a stopping service: close()
    gives up after its bound and names the model whose newest version is not on disk."""
    model = new_model()
    disk = StuckDisk()
    store = WeightStore(tmp_path, write=disk)
    persister = Persister(store, {"m": model})
    plane = SyncPlane({"m": model}, SyncLimits(), persister.committed)
    try:
        push(plane, 1)
        assert disk.entered.wait(WAIT_S)
        with caplog.at_level(logging.WARNING, logger="inference_service.persister"):
            persister.close(timeout_s=0.2)
        assert "model(s) m: the newest version was not yet on disk" in caplog.text
    finally:
        disk.release.set()
    persister.close()  # let go, the write it was in finishes
    assert stored(store) == [1]


def test_partial_files_a_crash_left_are_removed_at_start(tmp_path: Path) -> None:
    model = new_model()
    plane = SyncPlane({"m": model}, SyncLimits())
    push(plane, 1)
    assert WeightStore(tmp_path).save(model) == 1
    crashed = tmp_path / "m" / ".000000000002.safetensors.tmp"
    crashed.write_bytes(b"half a file")
    WeightStore(tmp_path)
    assert temp_files(tmp_path) == []
    assert stored(WeightStore(tmp_path)) == [1]
    assert_restores(tmp_path, 1)


def test_versions_past_twelve_digits_are_ordered_by_number_pruned_and_restored_newest(
    tmp_path: Path,
) -> None:
    """A file's name holds its version in twelve digits at least: 10^12 and on take more, and
    must still sort above 999999999999 (a writer numbering by milliseconds is past it)."""
    model = new_model()
    plane = SyncPlane({"m": model}, SyncLimits())
    store = WeightStore(tmp_path, history=3)
    first = 10**12 - 2
    for version in range(first, first + 5):
        push(plane, version)
        assert store.save(model) == version
    assert stored(store) == [10**12 + 2, 10**12 + 1, 10**12]
    assert_restores(tmp_path, 10**12 + 2)


def test_a_file_where_the_history_goes_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("not a directory")
    with pytest.raises(ConfigurationError, match=r"history .*models cannot be used: File exists"):
        WeightStore(tmp_path / "models")


# A state directory with its lock file in place started on a full disk (or an immutable model
# directory) and served, every AcquireWriter then answering UNAVAILABLE (an outside review).
def test_a_history_directory_that_cannot_be_written_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WeightStore(tmp_path)

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persistence, "write_all", full)
    with pytest.raises(ConfigurationError, match=r"m cannot be written: No space left on device"):
        store.restore(new_model())
    assert temp_files(tmp_path) == []


# Rolling back to a version whose file is there but cut short answered NOT_FOUND "is not on
# disk" (an outside review); a file damaged otherwise answered DATA_LOSS.
def test_a_stored_version_whose_file_cannot_be_read_is_damaged_not_missing(tmp_path: Path) -> None:
    model = new_model()
    plane = SyncPlane({"m": model}, SyncLimits())
    store = WeightStore(tmp_path)
    for version in (1, 2):
        push(plane, version)
        assert store.save(model) == version
    path = tmp_path / "m" / "000000000001.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoredVersionDamagedError, match="the stored version 1 is damaged"):
        store.find("m", 1)
    with pytest.raises(ModelNotFoundError, match="version 3 is not on disk"):
        store.find("m", 3)


# A version written while an older one could not be pruned was logged as "not written to disk".
def test_an_older_version_that_cannot_be_removed_leaves_the_new_one_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = new_model()
    plane = SyncPlane({"m": model}, SyncLimits())
    store = WeightStore(tmp_path, history=1)
    push(plane, 1)
    assert store.save(model) == 1
    push(plane, 2)

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level(logging.ERROR, "inference_service.persistence"):
        assert store.save(model) == 2
    assert "version 2 was written, but version 1 could not be removed" in caplog.text
    assert "not written" not in caplog.text
    monkeypatch.undo()
    assert_restores(tmp_path, 2)
