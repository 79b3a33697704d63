"""A replica whose serving process is stuck behind its live sync relay holds no sync.

With `--sync-relay on` the relay owns the sync plane's socket: it answers the trainer's and the
forwarding replicas' pings and takes a small push whole, whatever the serving process does. A
serving process that stops (SIGSTOP) or is frozen (the cgroup freezer, as `docker pause` does:
its threads sleep in the kernel, state D, the way a process stuck in a driver call or paging
does) must cost a sync seconds, not the push timeout: the relay gives its push up UNAVAILABLE,
naming the stuck serving process; the sync returns with every other replica committed bit-exact;
nothing of the given-up push is applied; once the process runs again it is caught up to the
newest version.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import safetensors.torch

from shared.weights.digest import state_digest
from tests.integration.apps import MLP
from tests.integration.catalogue import MB, Bench, assert_untouched
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.test_forwarding import free_ports, stamp_state
from tests.integration.test_relay import means
from trainer_service.publisher import Publisher, SyncReport

STAMP = "tests.integration.apps:stamp"
FREEZER = Path("/sys/fs/cgroup/freezer")  # cgroup v1's freezer hierarchy
HOWS = ["stopped", "frozen"]
# Far above what giving a stuck replica up takes (seconds), far below the push timeout the
# publishers here run with (PUSH_TIMEOUT_S), which a push held by a stuck replica would wait.
RETURNS_WITHIN_S = 45.0
PUSH_TIMEOUT_S = 90.0


def _freezer_cgroup(pid: int) -> Path:
    """The freezer cgroup directory process `pid` is in now."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return FREEZER / path.lstrip("/")
    return FREEZER


@contextmanager
def stuck(pid: int, how: str) -> Iterator[None]:
    """Process `pid` (every thread of it) makes no progress until the block ends: stopped by
    SIGSTOP, or frozen in a cgroup of its own (its threads then sleep uninterruptibly)."""
    if how == "stopped":
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
        return
    home = _freezer_cgroup(pid)
    group = FREEZER / f"weightsync-stuck-{pid}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"no writable cgroup v1 freezer here ({exc})")
    try:
        (group / "cgroup.procs").write_text(f"{pid}\n")
        (group / "freezer.state").write_text("FROZEN\n")
        wait_until(lambda: (group / "freezer.state").read_text().strip() == "FROZEN", 10)
        yield
    finally:
        (group / "freezer.state").write_text("THAWED\n")
        wait_until(lambda: (group / "freezer.state").read_text().strip() == "THAWED", 10)
        (home / "cgroup.procs").write_text(f"{pid}\n")
        group.rmdir()


def replicas(services: Services, count: int, *extra: str) -> list[Inference]:
    """`count` services, each behind its sync relay, in the order the trainer chains them;
    `extra` flags for the last one."""
    ports = free_ports(count)
    return [
        services.inference(
            STAMP,
            "--sync-listen",
            f"127.0.0.1:{port}",
            *(extra if i == count - 1 else ()),
            name=f"replica{i}",
        )
        for i, port in enumerate(ports)
    ]


def committed(replica: Inference, version: int) -> bool:
    state = replica.model_state("stamp")
    return state.version == version and state.digest == state_digest(stamp_state(version))


def receiving(replica: Inference, version: int) -> bool:
    pending = replica.model_state("stamp").pending
    return pending.version == version and pending.bytes_received > 0


def assert_stuck_one_lags_then_catches_up(
    report: SyncReport, others: list[Inference], lagging: Inference, version: int
) -> None:
    """The sync returned with every other replica at `version` bit-exact and `lagging` behind;
    running again, `lagging` is caught up to it bit-exact."""
    assert (report.version, report.lagging) == (version, (lagging.sync,)), report
    assert report.targets == len(others)  # the replicas that committed it
    for replica in others:
        assert committed(replica, version), replica.model_state("stamp")
    wait_until(lambda: committed(lagging, version), timeout=60)
    for replica in (*others, lagging):
        assert "Traceback" not in replica.log.read_text()


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


def test_a_replica_frozen_before_the_push_lags_and_is_caught_up(services: Services) -> None:
    # Stopped (SIGSTOP) instead: test_relay.py's. Found by the trainer's probe before the push.
    replica, stuck_one = replicas(services, 2)
    publisher = Publisher(
        [replica.sync, stuck_one.sync], "stuck", fanout="direct", timeout_s=PUSH_TIMEOUT_S
    )
    try:
        publisher.publish("stamp", stamp_state(1))
        with ThreadPoolExecutor(1) as pool, stuck(stuck_one.process.pid, "frozen"):
            sync = pool.submit(publisher.publish, "stamp", stamp_state(2))
            report = sync.result(timeout=RETURNS_WITHIN_S)  # the push timeout is 90 s
        assert_stuck_one_lags_then_catches_up(report, [replica], stuck_one, 2)
    finally:
        publisher.close()


def test_a_replica_frozen_mid_payload_lags_and_is_caught_up(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    # The last one applies 0.5 MB/s: the relay holds the whole push (a ring of 16 MiB) while its
    # serving process is found applying it.
    services.env["TEST_STAMP_MB"] = "2"
    replica, stuck_one = replicas(services, 2, "--sync-max-mb-per-s", "0.5")
    publisher = Publisher(
        [replica.sync, stuck_one.sync], "stuck", fanout="direct", timeout_s=PUSH_TIMEOUT_S
    )
    state = stamp_state(1, mb=2)
    try:
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", state)
            wait_until(lambda: receiving(stuck_one, 1), timeout=60)
            with stuck(stuck_one.process.pid, "frozen"), caplog.at_level("INFO", "trainer_service"):
                report = sync.result(timeout=RETURNS_WITHIN_S)
        assert (report.version, report.lagging) == (1, (stuck_one.sync,)), report
        # On the relay's word that the serving process stopped: the push given up by it, or
        # the trainer's look at what was applied of a push that had left whole into the relay.
        given_up = re.escape(f"{stuck_one.sync}: UNAVAILABLE: ")
        given_up += ".*the inference service stopped answering the sync relay"
        assert re.search(given_up, caplog.text), caplog.text
        digest = state_digest(state)
        assert replica.model_state("stamp").digest == digest
        wait_until(lambda: stuck_one.model_state("stamp").version == 1, timeout=60)
        assert stuck_one.model_state("stamp").digest == digest
        assert "Traceback" not in stuck_one.log.read_text()
    finally:
        publisher.close()


def test_a_push_whose_serving_process_freezes_before_its_commit_is_answered_fails_unavailable(
    services: Services, tmp_path: Path
) -> None:
    pretrained = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env.update(TEST_PRETRAINED=str(pretrained), TEST_STAMP_MB=str(MB))
    inference = services.inference("tests.integration.apps:catalogue")
    bench = Bench(inference)  # version 1 served: tensor i filled with i
    payload = bench.payload()
    go = threading.Event()

    def push() -> Iterator[bytes]:
        yield bench.header(version=2)
        yield bench.data_msg(payload)
        go.wait(timeout=60)
        yield bench.commit(bench.good_digest())

    call = bench.push_raw.future(push(), timeout=PUSH_TIMEOUT_S)
    try:
        # Every payload byte applied; the commit is still to come.
        wait_until(
            lambda: inference.model_state("stamp").pending.bytes_received == len(payload), 30
        )
        with stuck(inference.process.pid, "frozen"):
            go.set()
            error = call.exception(timeout=RETURNS_WITHIN_S)
    finally:
        go.set()
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    details = error.details() or ""
    assert "stopped answering the sync relay during the push" in details, details
    assert f"pid {inference.process.pid}" in details, details
    # Running again, it commits nothing of the push given up: version 1, bit-exact,
    assert_untouched(bench)
    assert means(inference) == [float(i) for i in range(8)]
    # and the same push, sent again, commits.
    again = [bench.header(version=2), bench.data_msg(payload), bench.commit(bench.good_digest())]
    assert bench.push_raw(iter(again), timeout=30).version == 2
    assert means(inference) == [100.0 + i for i in range(8)]
    assert "Traceback" not in inference.log.read_text()


@pytest.mark.parametrize("how", HOWS)
def test_a_middle_replica_of_a_chain_stuck_mid_push_is_routed_past_and_caught_up(
    services: Services, how: str
) -> None:
    # The middle one applies 1 MB/s: the push is found in flight there, whole in its relay.
    services.env["TEST_STAMP_MB"] = "2"
    ports = free_ports(3)
    first, middle, last = (
        services.inference(STAMP, "--sync-listen", f"127.0.0.1:{port}", *extra, name=name)
        for port, name, extra in zip(
            ports,
            ("first", "middle", "last"),
            ((), ("--sync-max-mb-per-s", "1"), ()),
            strict=True,
        )
    )
    publisher = Publisher([first.sync, middle.sync, last.sync], "stuck", timeout_s=PUSH_TIMEOUT_S)
    try:
        publisher.publish("stamp", stamp_state(1, mb=2))  # direct, in full
        report = publisher.publish("stamp", stamp_state(2, mb=2))  # down the chain
        assert (report.version, report.lagging) == (2, ()), report
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=2))
            wait_until(lambda: receiving(middle, 3), timeout=60)
            with stuck(middle.process.pid, how):
                report = sync.result(timeout=RETURNS_WITHIN_S)
        assert (report.version, report.targets, report.lagging) == (3, 2, (middle.sync,)), report
        # The first one's leg to it failed on the relay's word that the service stopped (asked
        # what it applied of the push, or on the push itself), not on the leg's own bound on an
        # answer after the commit, 10 s.
        given_up = re.escape(f"passing the push on to {middle.sync} failed: UNAVAILABLE: ")
        given_up += ".*the inference service stopped answering the sync relay"
        assert re.search(given_up, first.log.read_text()), first.log.read_text()
        digest = state_digest(stamp_state(3, mb=2))
        for replica in (first, last):
            assert replica.model_state("stamp").digest == digest
        wait_until(lambda: middle.model_state("stamp").version == 3, timeout=60)
        assert middle.model_state("stamp").digest == digest
        for replica in (first, middle, last):
            assert "Traceback" not in replica.log.read_text()
    finally:
        publisher.close()


def test_a_donor_frozen_mid_seed_is_given_up_within_the_sync(services: Services) -> None:
    # Stopped (SIGSTOP) instead: test_seed.py's. Found by the relay's watch of its connection
    # to the service, whose transport answers no ping once frozen.
    services.env["TEST_STAMP_MB"] = "2"
    donor, other = replicas(services, 2)
    publisher = Publisher([donor.sync, other.sync], "stuck", timeout_s=PUSH_TIMEOUT_S)
    try:
        publisher.publish("stamp", stamp_state(1, mb=2))
        publisher.publish("stamp", stamp_state(2, mb=2))
        # The other one restarts empty and applies 0.5 MB/s: its seed lasts about 4 s.
        other.process.kill()
        other.process.wait(timeout=10)
        back = services.inference(
            STAMP,
            *("--sync-listen", other.sync, "--sync-max-mb-per-s", "0.5"),
            *("--sync-relay", "off"),
            name="back",
        )
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=2))

            def seeded_in_flight() -> bool:
                pending = back.model_state("stamp").pending
                return pending.version == 3 and pending.bytes_received > 0

            wait_until(seeded_in_flight, timeout=60)
            with stuck(donor.process.pid, "frozen"):
                report = sync.result(timeout=RETURNS_WITHIN_S)
    finally:
        publisher.close()
    # The trainer pushed the replica itself within the same sync.
    assert (report.version, report.targets, report.lagging) == (3, 2, ()), report
    digest = state_digest(stamp_state(3, mb=2))
    assert (back.model_state("stamp").version, back.model_state("stamp").digest) == (3, digest)
    assert f"seeding {back.sync} with version 3" in donor.log.read_text()
    assert "the inference service stopped answering the sync relay" in donor.log.read_text()
    now = donor.model_state("stamp")
    assert (now.version, now.digest) == (3, digest)
