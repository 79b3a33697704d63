"""The version history an inference service keeps with --state-dir: a slow or full disk costs
history, never a push, and a restart serves the newest complete version bit-exactly."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from tests.integration.apps import Stamp
from tests.integration.conftest import Inference, Services, wait_until
from trainer_service.publisher import Publisher

STAMP = "tests.integration.apps:stamp"


def stamp_state(megabytes: int, version: int) -> dict[str, torch.Tensor]:
    """The stamp model's weights for `version`: each tensor a value of its own."""
    state = Stamp(megabytes).state_dict()
    return {
        name: torch.full_like(tensor, version * 10.0 + i)
        for i, (name, tensor) in enumerate(state.items())
    }


def listed(inference: Inference) -> list[tuple[int, bytes]]:
    """The versions of the stamp model the service keeps on disk, newest first, with digests."""
    reply = inference.sync_stub().ListVersions(
        pb.ListVersionsRequest(model_name="stamp"), timeout=10
    )
    return [(v.version, v.digest) for v in reply.versions]


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp"))


def queued(fd: int) -> int:
    """Bytes waiting in the pipe behind `fd`."""
    count = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return int.from_bytes(count, "little")


def drain_to_eof(fd: int, timeout: float = 60.0) -> None:
    """Read a FIFO until its writer has closed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not os.read(fd, 1 << 20):
                return
        except BlockingIOError:
            select.select([fd], [], [], 1.0)
    raise AssertionError("the history writer never closed the stuck file")


def restart(services: Services, inference: Inference, state_dir: Path) -> Inference:
    inference.process.send_signal(signal.SIGTERM)
    assert inference.process.wait(timeout=30) == 0
    return services.inference(STAMP, "--state-dir", str(state_dir), name="second")


def test_pushes_commit_while_the_history_write_is_stuck_on_the_disk(
    services: Services, tmp_path: Path
) -> None:
    services.env["TEST_STAMP_MB"] = "8"  # more than one write chunk
    state_dir = tmp_path / "state"
    inference = services.inference(STAMP, "--state-dir", str(state_dir), name="first")
    directory = state_dir / "models" / "stamp"
    directory.mkdir(parents=True, exist_ok=True)
    # A disk that takes the first 4 KiB of version 1's file and then stops: its temp file is a
    # FIFO whose reader (this test) reads nothing until both pushes below have committed.
    stuck = directory / ".000000000001.safetensors.tmp"
    os.mkfifo(stuck)
    reader = os.open(stuck, os.O_RDONLY | os.O_NONBLOCK)
    publisher = Publisher([inference.sync], "history-test", retries=0)
    try:
        fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
        capacity = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
        assert publisher.publish("stamp", stamp_state(8, 1)).version == 1
        wait_until(lambda: queued(reader) == capacity)  # the writer is stuck in version 1
        # Version 3 goes into the very copy that held version 1, the one being written.
        assert publisher.publish("stamp", stamp_state(8, 2)).version == 2
        assert publisher.publish("stamp", stamp_state(8, 3)).version == 3
        assert inference.model_state("stamp").digest == state_digest(stamp_state(8, 3))
        drain_to_eof(reader)  # the disk comes back; the writer gives version 1 up
    finally:
        os.close(reader)
        publisher.close()
    newest = state_digest(stamp_state(8, 3))
    wait_until(lambda: listed(inference)[:1] == [(3, newest)])
    assert [v for v, _ in listed(inference)] == [3]  # version 1 was given up, 2 coalesced away
    assert temp_files(directory) == []
    assert "version 1 was not written to disk: a push reused" in inference.log.read_text()

    again = restart(services, inference, state_dir)
    assert "model stamp: restored version 3 from" in again.log.read_text()
    restored = again.model_state("stamp")
    assert (restored.version, restored.digest, restored.writer_id) == (3, newest, "history-test")


@pytest.fixture
def small_disk(services: Services, tmp_path: Path) -> Iterator[Path]:
    """A 2.5 MiB tmpfs: room for two versions of a 1 MiB model, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            "a full-disk test needs a small tmpfs, and mounting one is not permitted here "
            f"(needs root or CAP_SYS_ADMIN): {done.stderr.strip()}"
        )
    try:
        yield mount
    finally:
        services.stop_all()  # the services hold files there
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_frees_older_versions_and_keeps_the_newest_one(
    services: Services, small_disk: Path
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    state_dir = small_disk / "state"
    inference = services.inference(STAMP, "--state-dir", str(state_dir), name="first")
    directory = state_dir / "models" / "stamp"
    publisher = Publisher([inference.sync], "history-test", retries=0)
    try:
        for version in (1, 2, 3, 4):
            state = stamp_state(1, version)
            assert publisher.publish("stamp", state).version == version
            written = [(version, state_digest(state))]
            wait_until(lambda: listed(inference)[:1] == written, 30)  # noqa: B023 - waited here
            assert temp_files(directory) == []
    finally:
        publisher.close()
    # The disk holds two versions: each write past that freed the oldest one and retried.
    assert [v for v, _ in listed(inference)] == [4, 3]
    log = inference.log.read_text()
    assert "out of disk space writing version 3; removed version 1 to make room" in log

    again = restart(services, inference, state_dir)
    assert "model stamp: restored version 4 from" in again.log.read_text()
    restored = again.model_state("stamp")
    assert (restored.version, restored.digest) == (4, state_digest(stamp_state(1, 4)))
