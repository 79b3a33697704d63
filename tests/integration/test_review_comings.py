"""What a review from outside found, with replicas that come and go and a caller holding the
sync token that is careless or hostile, each with real processes over gRPC: a route naming one
hop twice under two spellings (`localhost` and `127.0.0.1`, a port with leading zeros, an
IPv4-mapped IPv6 address) is refused before anything is passed on, as are a route naming its
receiver by an IPv4-mapped address of its own and a Seed aimed so at its donor; a trainer whose
first replica's host stops (service and sync relay) once the whole push has left is not held
to the push deadline: the watched link drops it, the sync returns with the others, and the
stopped one, running again, is caught up to the newest version bit-exact; a donor killed
mid-seed, its hop holding the seeded push back for its `--sync-max-mb-per-s`, does not make the
trainer's own push to that hop fail as "another push in progress"."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import safetensors.torch

from shared import protocol
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import error_reason
from shared.weights.digest import state_digest
from tests.integration.apps import MLP
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.test_forwarding import STAMP, Sync, forwarded_to, free_ports, stamp_state
from tests.integration.test_seed import seed_refusal, started_pair
from trainer_service.publisher import Publisher

# Spellings of the loopback address `127.0.0.1:{port}` a service listens on: itself, and others.
SPELLINGS = [
    "127.0.0.1:{port}",
    "localhost:{port}",
    "LOCALHOST:{port}",
    "127.0.0.1:0{port}",
    "[::ffff:127.0.0.1]:{port}",
]


@pytest.fixture(autouse=True)
def small_stamp(services: Services) -> None:
    services.env["TEST_STAMP_MB"] = "1"


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_route_naming_a_hop_twice_under_two_spellings_is_refused_before_anything_is_passed_on(
    services: Services, spelling: str
) -> None:
    first = services.inference(STAMP, "--sync-relay", "off", name="first")
    hop = services.inference(STAMP, "--sync-relay", "off", name="hop")
    to_first, to_hop = Sync(first.sync), Sync(hop.sync)
    before = [to_first.state(), to_hop.state()]
    epoch = to_hop.acquire("tester")
    again = spelling.format(port=hop.sync.rsplit(":", 1)[1])
    twice = [
        pb.Hop(address=hop.sync, writer_epoch=epoch),
        pb.Hop(address=again, writer_epoch=epoch),
    ]

    with pytest.raises(grpc.RpcError) as refused:
        to_first.push(stamp_state(3), 2, to_first.acquire("tester"), twice)

    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_PUSH
    before_it = "" if again == hop.sync else f" (as {hop.sync!r} before it)"
    assert f"names the hop {again!r} twice{before_it}" in (error.details() or "")
    assert forwarded_to(services, "first") == []
    for sync, was in zip((to_first, to_hop), before, strict=True):
        now = sync.state()
        assert (now.version, now.digest, now.pending.version) == (was.version, was.digest, 0)
    # Named once, the push commits on both, each once.
    response = to_first.push(stamp_state(3), 2, to_first.acquire("tester"), twice[:1])
    assert [(h.address, h.version) for h in response.hops] == [(hop.sync, 2)]
    assert to_hop.state().digest == state_digest(stamp_state(3))
    assert services.log("hop").count("committed version 2") == 1


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_route_naming_its_receiver_by_an_ipv4_mapped_address_is_refused(
    services: Services, relay: str
) -> None:
    first = services.inference(STAMP, "--sync-relay", relay, name="first")
    to_first = Sync(first.sync)
    before = to_first.state()
    epoch = to_first.acquire("tester")
    itself = f"[::ffff:127.0.0.1]:{first.sync.rsplit(':', 1)[1]}"

    with pytest.raises(grpc.RpcError) as refused:
        to_first.push(stamp_state(3), 2, epoch, [pb.Hop(address=itself, writer_epoch=epoch)])

    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == protocol.MALFORMED_PUSH
    assert f"names this replica itself ({itself!r})" in (error.details() or "")
    assert forwarded_to(services, "first") == []
    now = to_first.state()
    assert (now.version, now.digest, now.pending.version) == (before.version, before.digest, 0)


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_seed_to_its_donor_by_an_ipv4_mapped_address_is_refused_and_changes_nothing(
    services: Services, tmp_path: Path, relay: str
) -> None:
    pretrained = tmp_path / "frozen.safetensors"  # the catalogue's inference-only model
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env["TEST_PRETRAINED"] = str(pretrained)
    donor, _, to_donor, _ = started_pair(services, relay)
    before = to_donor.state()
    itself = f"[::ffff:127.0.0.1]:{donor.sync.rsplit(':', 1)[1]}"
    hop = pb.Hop(address=itself, writer_epoch=to_donor.acquire("tester"))

    error = seed_refusal(to_donor, 3, hop)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"the hop {itself!r} is this replica's own sync plane" in (error.details() or "")
    now = to_donor.state()
    assert (now.version, now.digest, now.pending.version) == (3, before.digest, 0)


def test_a_first_replica_whose_host_stops_after_the_push_left_is_dropped_and_caught_up(
    services: Services, tmp_path: Path
) -> None:
    services.env["TEST_STAMP_MB"] = "2"
    ports = free_ports(2)  # in chain order: the trainer pushes to the first

    def replica(i: int, *extra: str) -> Inference:
        listen = ("--sync-listen", f"127.0.0.1:{ports[i]}", "--state-dir", str(tmp_path / f"{i}"))
        return services.inference(STAMP, *listen, *extra, name=f"replica{i}")

    # The first applies pushes at 1 MB/s; its sync relay takes a 2 MB push at once.
    first, other = replica(0, "--sync-max-mb-per-s", "1"), replica(1)
    assert first.relay_pid is not None
    publisher = Publisher([first.sync, other.sync], "w", connect_timeout_s=2)
    try:
        publisher.publish("stamp", stamp_state(1, mb=2))
        publisher.publish("stamp", stamp_state(2, mb=2))  # down the chain
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=2))

            def applying() -> bool:
                pending = Sync(first.sync).state().pending
                return pending.version == 3 and pending.bytes_received > 0

            wait_until(applying, timeout=30)
            # The host stops: the service and its relay, which holds the whole push by now.
            stopped = [first.process.pid, first.relay_pid]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            try:
                report = sync.result(timeout=60)  # before: held to the push deadline (600 s)
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
        assert (report.version, report.targets, report.lagging) == (3, 1, (first.sync,))
        digest = state_digest(stamp_state(3, mb=2))
        now = Sync(other.sync).state()
        assert (now.version, now.digest) == (3, digest)
        # Running again, the stopped one serves only what was committed whole, and is caught
        # up to the newest version in the background.
        wait_until(lambda: Sync(first.sync).state().version == 3, timeout=60)
        now = Sync(first.sync).state()
        assert (now.version, now.digest, now.pending.version) == (3, digest, 0)
    finally:
        publisher.close()


def test_a_donor_killed_mid_seed_of_a_rate_limited_replica_leaves_the_trainer_to_push_it(
    services: Services, tmp_path: Path
) -> None:
    ports = free_ports(3)  # in chain order

    def replica(i: int, name: str, *extra: str) -> Inference:
        listen = ("--sync-listen", f"127.0.0.1:{ports[i]}", "--state-dir", str(tmp_path / f"{i}"))
        return services.inference(STAMP, *listen, *extra, name=name)

    replicas = [replica(i, f"replica{i}") for i in range(3)]
    publisher = Publisher([r.sync for r in replicas], "w", connect_timeout_s=2)
    try:
        publisher.publish("stamp", stamp_state(1))
        publisher.publish("stamp", stamp_state(2))
        # The last one comes back empty, taking pushes at 0.25 MB/s: it holds each 1 MiB
        # message about 4 s.
        replicas[2].process.kill()
        replicas[2].process.wait(timeout=10)
        (tmp_path / "2").rename(tmp_path / "2.lost")
        back = replica(2, "back", "--sync-max-mb-per-s", "0.25", "--sync-relay", "off")
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3))

            def seeded_in_flight() -> bool:
                pending = Sync(back.sync).state().pending
                return pending.version == 3 and pending.bytes_received > 0

            wait_until(seeded_in_flight, timeout=60)
            seeding = f"seeding {back.sync} with version 3"
            [donor] = [i for i in (0, 1) if seeding in services.log(f"replica{i}")]
            replicas[donor].process.kill()
            replicas[donor].process.wait(timeout=10)
            # Before: the trainer's push to `back` was refused ABORTED ("another push from 'w'
            # (version 3) is in progress") and the sync failed.
            report = sync.result(timeout=60)
        # The donor had committed version 3 before it seeded: every replica holds it.
        assert (report.version, report.targets, report.lagging) == (3, 3, ())
        digest = state_digest(stamp_state(3))
        for live in (replicas[1 - donor], back):
            now = Sync(live.sync).state()
            assert (now.version, now.digest, now.pending.version) == (3, digest, 0)
        # The donor, back on its port and state directory, takes the next version with the
        # others.
        replicas[donor] = replica(donor, "donor-again")
        report = publisher.publish("stamp", stamp_state(4))
        assert (report.version, report.targets, report.lagging) == (4, 3, ())
        for live in (replicas[0], replicas[1], back):
            now = Sync(live.sync).state()
            assert (now.version, now.digest) == (4, state_digest(stamp_state(4)))
    finally:
        publisher.close()
