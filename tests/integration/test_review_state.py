"""State on disk, attacked from outside: files damaged between restarts, a full disk.

A damaged file is refused at start with a line naming it, or passed over for the last good
state; the services never serve, nor train on and push, weights nobody committed."""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch

from devtools.launch import inference_command, trainer_command
from shared.weights.digest import state_digest
from tests.faults.disk import StateDisk
from tests.integration.apps import MLP
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.test_history import listed, stamp_state
from tests.integration.test_tools import ADMIN, tool
from trainer_service.publisher import Publisher

PAIR = "tests.integration.apps:pair"
STAMP = "tests.integration.apps:stamp"


def flip_last_byte(path: Path) -> None:
    """Flip one bit near the end of `path`: inside the last tensor's bytes of a safetensors."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def file_instead(path: Path) -> None:
    shutil.rmtree(path)
    path.write_bytes(b"")


def stop(inference: Inference) -> None:
    inference.process.send_signal(signal.SIGTERM)
    assert inference.process.wait(timeout=30) == 0


def test_a_damaged_checkpoint_is_refused_at_start_naming_the_file_and_pushes_nothing(
    services: Services, tmp_path: Path
) -> None:
    safetensors.torch.save_file(MLP().state_dict(), tmp_path / "frozen.safetensors")
    services.env["TEST_PRETRAINED"] = str(tmp_path / "frozen.safetensors")
    inference = services.inference(PAIR)
    state = tmp_path / "trainer-state"
    first = services.trainer(
        PAIR, [inference], "--state-dir", str(state), "--max-runs", "1", name="first"
    )
    assert first.wait(timeout=120) == 0, services.log("first")
    served = inference.model_state("mlp")
    good = tmp_path / "good-checkpoint"
    shutil.copytree(state / "checkpoint", good)
    checkpoint = state / "checkpoint"
    weights = checkpoint / "models" / "mlp.safetensors"
    damages: list[tuple[Path, Callable[[Path], None], str]] = [
        (weights, flip_last_byte, f"is damaged: {weights} does not match its hash"),
        (weights, cut_in_half, f"is damaged: {weights} holds"),
        (checkpoint, file_instead, "is not a directory; the trainer does not start afresh"),
    ]
    for attempt, (target, damage, problem) in enumerate(damages):
        shutil.rmtree(checkpoint, ignore_errors=True)
        checkpoint.unlink(missing_ok=True)
        shutil.copytree(good, checkpoint)
        damage(target)
        name = f"damaged-{attempt}"
        again = services.trainer(
            PAIR, [inference], "--state-dir", str(state), "--max-runs", "1", name=name
        )
        assert again.wait(timeout=120) == 2, services.log(name)
        log = services.log(name)
        assert f"checkpoint {checkpoint} {problem}" in log
        assert "Traceback" not in log
        after = inference.model_state("mlp")  # nothing pushed: the served weights are as were
        assert (after.version, after.digest) == (served.version, served.digest)


def refused_start(services: Services, state_dir: Path, name: str) -> str:
    """Start an inference service on `state_dir` that must refuse to start; its log."""
    ready = services.directory / f"{name}.ready.json"
    command = inference_command(STAMP, ready, "--state-dir", str(state_dir), "--sync-relay", "on")
    process = services.spawn(command, name)
    wait_until(lambda: process.poll() is not None or ready.exists())
    assert process.poll() == 2, "it started"
    log = services.log(name)
    assert "Traceback" not in log
    return log


def two_versions_on_disk(services: Services, tmp_path: Path) -> tuple[Path, Path]:
    """A stopped inference service's state directory holding versions 1 and 2 of the stamp
    model from writer `state-test`, and the model's folder in it."""
    services.env["TEST_STAMP_MB"] = "1"
    state_dir = tmp_path / "state"
    inference = services.inference(STAMP, "--state-dir", str(state_dir), name="first")
    publisher = Publisher([inference.sync], "state-test", retries=0)
    try:
        for version in (1, 2):
            assert publisher.publish("stamp", stamp_state(1, version)).version == version
    finally:
        publisher.close()
    wait_until(lambda: [v for v, _ in listed(inference)] == [2, 1], 30)
    stop(inference)
    return state_dir, state_dir / "models" / "stamp"


def test_weights_files_none_of_which_checks_out_stop_the_start_naming_them(
    services: Services, tmp_path: Path
) -> None:
    state_dir, directory = two_versions_on_disk(services, tmp_path)
    first, second = (directory / f"00000000000{v}.safetensors" for v in (1, 2))
    # Swapped: each file holds the other's version (the older one would be served as newest).
    first.rename(tmp_path / "held")
    second.rename(first)
    (tmp_path / "held").rename(second)
    log = refused_start(services, state_dir, "swapped")
    assert "model 'stamp': no weights file in" in log
    assert f"{second.name} names version 1 in its metadata" in log
    assert f"{first.name} names version 2 in its metadata" in log

    first.rename(tmp_path / "held")  # swapped back, then damaged
    second.rename(first)
    (tmp_path / "held").rename(second)
    flip_last_byte(second)
    cut_in_half(first)
    log = refused_start(services, state_dir, "damaged")
    assert f"{second.name} fails its digest check" in log
    assert f"{first.name} cannot be read" in log


def test_a_damaged_newest_version_falls_back_to_the_older_one_and_its_number_is_written_again(
    services: Services, tmp_path: Path
) -> None:
    state_dir, directory = two_versions_on_disk(services, tmp_path)
    flip_last_byte(directory / "000000000002.safetensors")

    second = services.inference(STAMP, "--state-dir", str(state_dir), name="second")
    log = second.log.read_text()
    assert "writer 'state-test' (epoch 1) restored from" in log
    assert "Logging error" not in log
    assert "000000000002.safetensors fails its digest check; not restoring it" in log
    assert "model stamp: restored version 1 from" in log
    restored = second.model_state("stamp")
    assert (restored.version, restored.digest) == (1, state_digest(stamp_state(1, 1)))
    assert (directory / "000000000002.safetensors.corrupt").is_file()  # kept for the operator

    # Version 2 is pushed again, with other weights: it is written, not taken for the old file.
    weights = stamp_state(1, 7)
    publisher = Publisher([second.sync], "state-test", retries=0)
    try:
        assert publisher.publish("stamp", weights).version == 2
    finally:
        publisher.close()
    wait_until(lambda: listed(second)[:1] == [(2, state_digest(weights))], 30)
    stop(second)
    third = services.inference(STAMP, "--state-dir", str(state_dir), name="third")
    assert "model stamp: restored version 2 from" in third.log.read_text()
    assert third.model_state("stamp").digest == state_digest(weights)


@pytest.fixture
def small_disk(services: Services, tmp_path: Path) -> Iterator[StateDisk]:
    """A small tmpfs (tests/faults/disk.py): room for the pair app's checkpoints until filled."""
    disk = StateDisk(tmp_path / "disk")
    if not disk.mount():
        pytest.skip(
            f"a full-disk test needs a small tmpfs, and none could be mounted: {disk.mount_error}"
        )
    try:
        yield disk
    finally:
        services.stop_all()  # the trainers hold files there
        problems = disk.unmount()
        assert not problems, problems


def test_a_checkpoint_the_full_disk_refuses_is_logged_removed_and_the_last_one_resumes(
    services: Services, tmp_path: Path, small_disk: StateDisk
) -> None:
    safetensors.torch.save_file(MLP().state_dict(), tmp_path / "frozen.safetensors")
    services.env["TEST_PRETRAINED"] = str(tmp_path / "frozen.safetensors")
    inference = services.inference(PAIR)
    state = small_disk.path / "trainer-state"
    first = services.trainer(
        PAIR, [inference], "--state-dir", str(state), "--max-runs", "1", name="first"
    )
    assert first.wait(timeout=120) == 0, services.log("first")
    weights = (state / "checkpoint" / "models" / "mlp.safetensors").read_bytes()
    small_disk.fill()

    full = services.trainer(
        PAIR,
        [inference],
        "--state-dir",
        str(state),
        "--max-runs",
        "1",
        "--checkpoint-every",
        "1",
        name="full",
    )
    assert full.wait(timeout=120) == 4, services.log("full")
    log = services.log("full")
    refused = f"checkpoint not written to {state}: "
    kept = f"the last complete one, {state / 'checkpoint'}, is kept"
    assert f"{kept}; training goes on, the next checkpoint tries again" in log  # periodic
    assert f"stopping: {refused}" in log and "No space left on device" in log  # at exit
    assert "Traceback" not in log
    assert not (state / ".checkpoint-next").exists()  # the partial one is removed
    assert (state / "checkpoint" / "models" / "mlp.safetensors").read_bytes() == weights

    small_disk.free()
    served = inference.model_state("mlp").version
    again = services.trainer(
        PAIR, [inference], "--state-dir", str(state), "--max-runs", "1", name="again"
    )
    assert again.wait(timeout=120) == 0, services.log("again")
    assert f"resumed from {state / 'checkpoint'}" in services.log("again")
    assert inference.model_state("mlp").version == served + 2  # its catch-up sync, one run


def beyond_65535(address: str) -> str:
    """`address` with its port plus 65536: the same port to a dialler that wraps it."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + 65536}"


def test_the_tools_refuse_a_port_past_65535_rather_than_dial_it_modulo(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    inference = services.inference(STAMP)
    data = beyond_65535(inference.data)
    health = tool(services, sys.executable, "-m", "shared.healthcheck", data)
    assert health.returncode == 1  # not "serving": nothing serves there
    port = data.rpartition(":")[2]
    assert health.stderr == f"healthcheck: '{data}' names port {port}, outside 1 to 65535\n"

    sync = beyond_65535(inference.sync)
    listing = tool(services, ADMIN, "--sync", sync, "models")
    assert listing.returncode == 2
    assert listing.stdout == ""
    port = sync.rpartition(":")[2]
    assert listing.stderr == f"weightsync-admin: '{sync}' names port {port}, outside 1 to 65535\n"


def test_a_rollback_to_a_version_no_push_can_carry_is_a_usage_error_and_changes_nothing(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    inference = services.inference(STAMP)
    before = inference.model_state("stamp")
    for version in ("-1", str(1 << 64), str(1 << 63), "0"):
        done = tool(services, ADMIN, "--sync", inference.sync, "rollback", "stamp", "--to", version)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert (
            f"weightsync-admin rollback: error: argument --to: {version} is outside 1 to "
            f"{(1 << 63) - 1}\n"
        ) in done.stderr
    after = inference.model_state("stamp")
    assert (after.version, after.digest) == (before.version, before.digest)


def test_services_on_a_full_state_disk_refuse_to_start_naming_the_directory(
    services: Services, tmp_path: Path, small_disk: StateDisk
) -> None:
    safetensors.torch.save_file(MLP().state_dict(), tmp_path / "frozen.safetensors")
    services.env["TEST_PRETRAINED"] = str(tmp_path / "frozen.safetensors")
    small_disk.fill()
    flags = ("--metrics-listen", "127.0.0.1:0", "--state-dir", "{dir}")
    for name, command in (
        ("trainer", trainer_command(PAIR, ["127.0.0.1:1"], *flags)),
        ("inference", inference_command(PAIR, tmp_path / "ready.json", *flags)),
    ):
        state = small_disk.path / name
        process = services.spawn([str(state) if c == "{dir}" else c for c in command], name)
        assert process.wait(timeout=60) == 2
        log = services.log(name)
        assert (
            f"state directory {state} cannot be used: No space left on device ({state}/.lock)"
            in log
        )
        assert "Traceback" not in log


def test_a_tls_file_that_holds_no_pem_is_named_not_taken_for_a_port_that_cannot_bind(
    services: Services, tmp_path: Path, pki: Path
) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")  # a file mixed up with another one
    tls = ("--tls-cert", str(garbage), "--tls-key", str(pki / "server.key"))
    command = inference_command(
        STAMP, tmp_path / "ready.json", "--metrics-listen", "127.0.0.1:0", *tls
    )
    assert services.spawn(command, "inference").wait(timeout=60) == 2
    log = services.log("inference")
    assert f"ERROR inference_service: {garbage} holds no PEM certificate\n" in log
    assert "cannot listen" not in log

    health = tool(
        services,
        sys.executable,
        "-m",
        "shared.healthcheck",
        "127.0.0.1:1",
        "--tls-ca",
        str(garbage),
    )
    assert health.returncode == 1
    assert health.stderr == f"healthcheck: {garbage} holds no PEM certificate\n"
