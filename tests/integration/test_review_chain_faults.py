"""Forwarding when replicas fail or are misconfigured, with real processes over gRPC: hops
that never read are cut and routed past; a first replica killed after its own commit, or a
middle one restarted empty mid-push, leaves no replica behind for good; replicas that cannot
verify each other's certificates, and the hop after a rate-limited replica, are still fed
within the sync."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.auth import TlsFiles
from shared.weights.digest import state_digest
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.pki import make_pki
from tests.integration.test_forwarding import STAMP, Sync, free_ports, stamp_state
from tests.integration.test_review_chain import TOKEN, code, unchanged
from trainer_service.publisher import Publisher


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


@pytest.fixture
def never_reads() -> Iterator[str]:
    """An address whose listener takes connections into its backlog and never reads a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_hops_that_never_read_are_cut_and_the_push_goes_on_to_the_hops_after_them(
    services: Services, never_reads: str
) -> None:
    """A port that takes the connection and never reads, then a replica whose process is
    stopped (SIGSTOP, no relay before it): each is cut and reported, the good hop after them
    commits, and the stopped one, running again, holds nothing of the push."""
    first = services.inference(STAMP, name="first")
    stopped = services.inference(STAMP, "--sync-relay", "off", name="stopped")
    good = services.inference(STAMP, name="good")
    to_first, to_stopped, to_good = Sync(first.sync), Sync(stopped.sync), Sync(good.sync)
    before = to_stopped.state()
    route = [
        pb.Hop(address=never_reads, writer_epoch=1),
        pb.Hop(address=stopped.sync, writer_epoch=to_stopped.acquire("tester")),
        pb.Hop(address=good.sync, writer_epoch=to_good.acquire("tester")),
    ]
    os.kill(stopped.process.pid, signal.SIGSTOP)
    try:
        response = to_first.push(stamp_state(4), 2, to_first.acquire("tester"), route)
    finally:
        os.kill(stopped.process.pid, signal.SIGCONT)

    assert response.version == 2
    results = [(h.address, h.version) for h in response.hops]
    assert results == [(never_reads, 0), (stopped.sync, 0), (good.sync, 2)]
    lagging = {code(grpc.StatusCode.DEADLINE_EXCEEDED), code(grpc.StatusCode.UNAVAILABLE)}
    assert {response.hops[0].code, response.hops[1].code} <= lagging, response.hops
    assert to_good.state().digest == state_digest(stamp_state(4))
    unchanged(to_stopped, before)


@pytest.mark.parametrize("stage", ["mid-data", "after-its-commit"])
def test_a_first_replica_killed_mid_push_or_after_its_own_commit_leaves_no_hop_behind(
    services: Services, tmp_path: Path, stage: str
) -> None:
    """The first replica of the chain is killed (-9) while its hop, which takes pushes slowly,
    applies the push passed on to it: before the first's own commit, or after it. The sync
    returns with the hop at the version bit-exact; the first, restarted on its state, is
    caught up."""
    services.env["TEST_STAMP_MB"] = "4"
    ports = free_ports(2)  # in chain order

    def replica(i: int, name: str, *extra: str) -> Inference:
        listen = ("--sync-listen", f"127.0.0.1:{ports[i]}", "--state-dir", str(tmp_path / f"{i}"))
        return services.inference(STAMP, *listen, *extra, name=name)

    # Mid-data, the first takes the push slowly too: it passes it on as it applies it.
    first = replica(0, "first", *(("--sync-max-mb-per-s", "1") if stage == "mid-data" else ()))
    hop = replica(1, "hop", "--sync-max-mb-per-s", "1", "--sync-relay", "off")
    publisher = Publisher([first.sync, hop.sync], "w", connect_timeout_s=2)
    try:
        publisher.publish("stamp", stamp_state(1, mb=4))
        publisher.publish("stamp", stamp_state(2, mb=4))  # down the chain
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=4))

            def reached() -> bool:
                held, passed_on = Sync(first.sync).state(), Sync(hop.sync).state()
                if stage == "mid-data":
                    return held.version == 2 and passed_on.pending.bytes_received > 0
                return held.version == 3 and passed_on.version == 2

            wait_until(reached, timeout=60, interval=0.01)
            first.process.kill()
            first.process.wait(timeout=10)
            report = sync.result(timeout=120)
        assert report.version == 3
        digest = state_digest(stamp_state(3, mb=4))
        now = Sync(hop.sync).state()
        assert (now.version, now.digest) == (3, digest), report
        assert hop.sync not in report.lagging
        again = replica(0, "again")
        wait_until(lambda: Sync(again.sync).state().version == 3, timeout=60)
        assert Sync(again.sync).state().digest == digest
    finally:
        publisher.close()


def test_a_middle_replica_restarted_empty_mid_push_is_caught_up_and_fed_by_the_next_sync(
    services: Services,
) -> None:
    """The middle replica of a chain is killed (-9) while the push flows through it and comes
    straight back on its address without its state: the sync returns with the others at the
    version, the middle one is caught up to it bit-exact, and the next sync feeds all three."""
    services.env["TEST_STAMP_MB"] = "4"
    ports = free_ports(3)  # in chain order

    def replica(i: int, name: str, *extra: str) -> Inference:
        return services.inference(
            STAMP, "--sync-listen", f"127.0.0.1:{ports[i]}", *extra, name=name
        )

    first, last = replica(0, "first"), replica(2, "last")
    middle = replica(1, "middle", "--sync-max-mb-per-s", "2", "--sync-relay", "off")
    addresses = [first.sync, middle.sync, last.sync]
    publisher = Publisher(addresses, "w", connect_timeout_s=5)
    try:
        publisher.publish("stamp", stamp_state(1, mb=4))
        publisher.publish("stamp", stamp_state(2, mb=4))  # down the chain
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=4))
            wait_until(lambda: Sync(last.sync).state().pending.bytes_received > 0, timeout=60)
            middle.process.kill()
            middle.process.wait(timeout=10)
            back = replica(1, "back")
            report = sync.result(timeout=120)
        # Down when the sync looked, it may lag; it never holds the sync nor the others.
        assert report.version == 3 and set(report.lagging) <= {middle.sync}, report
        digest = state_digest(stamp_state(3, mb=4))
        wait_until(lambda: Sync(back.sync).state().version == 3, timeout=60)
        for replica_ in (first, back, last):
            now = Sync(replica_.sync).state()
            assert (now.version, now.digest, now.writer_id) == (3, digest, "w")
            assert not now.HasField("pending")
        report = publisher.publish("stamp", stamp_state(4, mb=4))
        assert (report.version, report.targets, report.lagging) == (4, 3, ()), report
    finally:
        publisher.close()


def test_replicas_that_cannot_verify_each_other_are_still_fed_within_the_sync(
    services: Services, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS on the sync plane with certificates the trainer trusts, but the replicas given no
    `--tls-peer-ca` (a careless operator): no replica can dial the next one. Every sync still
    returns with every replica at its version."""
    pki = make_pki(tmp_path / "pki")
    services.env.update(
        INFERENCE_SYNC_TOKEN=TOKEN,
        INFERENCE_TLS_CERT=str(pki / "server.pem"),
        INFERENCE_TLS_KEY=str(pki / "server.key"),
    )
    ports = free_ports(3)
    replicas = [
        services.inference(STAMP, "--sync-listen", f"127.0.0.1:{port}", name=f"replica{i}")
        for i, port in enumerate(ports)
    ]
    publisher = Publisher(
        [r.sync for r in replicas],
        "w",
        connect_timeout_s=2,
        token=TOKEN,
        tls=TlsFiles(ca=pki / "ca.pem"),
    )
    try:
        for version in (1, 2, 3):
            report = publisher.publish("stamp", stamp_state(version))
            assert (report.version, report.targets, report.lagging) == (version, 3, ()), report
            for replica in replicas:
                now = Sync(replica.sync, TOKEN, pki).state()
                assert (now.version, now.digest) == (version, state_digest(stamp_state(version)))
        # One comes back without its state: no replica can seed it either, the trainer does.
        replicas[1].process.kill()
        replicas[1].process.wait(timeout=10)
        back = services.inference(STAMP, "--sync-listen", replicas[1].sync, name="back")
        report = publisher.publish("stamp", stamp_state(4))
        assert (report.version, report.targets, report.lagging) == (4, 3, ()), report
        for replica in (replicas[0], back, replicas[2]):
            now = Sync(replica.sync, TOKEN, pki).state()
            assert (now.version, now.digest) == (4, state_digest(stamp_state(4)))
    finally:
        publisher.close()
    assert "was not reached through the chain, but answers the trainer" in caplog.text


@pytest.mark.parametrize("relay", ["on", "off"])
def test_the_hop_after_a_rate_limited_replica_commits_the_push_passed_on_to_it(
    services: Services, relay: str
) -> None:
    """The middle replica of a chain takes pushes at 0.3 MB/s (`--sync-max-mb-per-s`), so
    applying a 2 MB version takes it about 7 s, longer than a push may send nothing
    (`--push-idle-timeout-s`, 5 s): the last replica still commits the push the middle passes
    on to it, with no push of its own from the trainer, and the sync returns with all three."""
    services.env["TEST_STAMP_MB"] = "2"
    ports = free_ports(3)  # in chain order
    slow = ("--sync-max-mb-per-s", "0.3", "--sync-relay", relay)
    replicas = [
        services.inference(
            STAMP, "--sync-listen", f"127.0.0.1:{port}", *(slow if i == 1 else ()), name=f"r{i}"
        )
        for i, port in enumerate(ports)
    ]
    publisher = Publisher([r.sync for r in replicas], "w", connect_timeout_s=5)
    try:
        publisher.publish("stamp", stamp_state(1, mb=2))
        report = publisher.publish("stamp", stamp_state(2, mb=2))  # down the chain
    finally:
        publisher.close()
    assert (report.version, report.targets, report.lagging) == (2, 3, ()), report
    digest = state_digest(stamp_state(2, mb=2))
    for replica in replicas:
        now = Sync(replica.sync).state()
        assert (now.version, now.digest) == (2, digest)
    assert "failed" not in services.log("r1"), services.log("r1")
    commits = [line for line in services.log("r2").splitlines() if "committed version" in line]
    assert len(commits) == 2 and "committed version 2" in commits[1], commits
