"""Seed: a replica pushes the version it serves to another replica, so that the trainer catches
a new or lagging replica up from a neighbour instead of over its own link. The hop checks and
commits a seeded push on its own, refusing it exactly where it would refuse a direct one; a
seed the replica cannot start gets a status of its own, and nothing served changes."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
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
from tests.integration.test_forwarding import (
    Sync,
    forwarded_to,
    free_ports,
    refusal,
    served_version,
    stamp_state,
)
from trainer_service.publisher import Publisher

STAMP = "tests.integration.apps:stamp"
CATALOGUE = "tests.integration.apps:catalogue"  # stamp, and "frozen", an inference-only model
TOKEN = "seed-secret"


@pytest.fixture(autouse=True)
def small_models(services: Services, tmp_path: Path) -> None:
    services.env["TEST_STAMP_MB"] = "1"
    pretrained = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env["TEST_PRETRAINED"] = str(pretrained)


def seed(sync: Sync, version: int, hop: pb.Hop, model: str = "stamp") -> pb.HopResult:
    request = pb.SeedRequest(model_name=model, version=version, hop=hop)
    result: pb.HopResult = sync.stub().Seed(request, timeout=30, metadata=sync.metadata)
    return result


def seed_refusal(sync: Sync, version: int, hop: pb.Hop, model: str = "stamp") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        seed(sync, version, hop, model)
    return refused.value


def trainer_metric(services: Services, name: str, sample: str) -> float | None:
    """One sample of the trainer's metrics (None when it has none)."""
    port = re.search(r"metrics on port (\d+)", services.log(name))
    assert port, services.log(name)
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_a_replica_started_after_the_first_sync_is_caught_up_from_a_neighbour(
    services: Services,
) -> None:
    [late_port] = free_ports(1)
    late_address = f"127.0.0.1:{late_port}"  # nothing listens there yet
    early = services.inference(STAMP, name="early")
    # One run after the first sync, then a long wait: only the catch-up can feed the late one.
    trainer = services.start_trainer(
        STAMP,
        [early.sync, late_address],
        *("--trainer-id", "trainer", "--metrics-listen", "127.0.0.1:0"),
        *("--max-runs", "2", "--run-interval", "600", "--connect-timeout", "1"),
        name="trainer",
    )
    wait_until(lambda: "version 2 committed on 1" in services.log("trainer"), timeout=60)
    assert f"lagging: {late_address}" in services.log("trainer")

    late = services.inference(STAMP, "--sync-listen", late_address, name="late")
    wait_until(
        lambda: f"{late_address} caught up from {early.sync}" in services.log("trainer"),
        timeout=30,
    )
    state, neighbour = late.model_state("stamp"), early.model_state("stamp")
    assert (state.version, state.digest) == (2, state_digest(stamp_state(1)))
    assert (state.digest, state.writer_id) == (neighbour.digest, neighbour.writer_id)
    assert served_version(late) == "2"
    assert f"seeded {late_address} with version 2" in services.log("early")
    # The trainer pushed in full once (version 1, to the early one) and a delta once (version
    # 2): nothing to the late one.
    pushes = 'weightsync_trainer_pushes_total{kind="%s",model="stamp",result="committed"}'
    assert trainer_metric(services, "trainer", pushes % "full") == 1.0
    assert trainer_metric(services, "trainer", pushes % "delta") == 1.0
    assert trainer.poll() is None  # still waiting out its run interval: no sync did this


def test_a_replica_restarted_without_its_state_is_routed_past_and_seeded_within_the_sync(
    services: Services,
) -> None:
    ports = free_ports(3)  # in chain order
    replicas = [
        services.inference(STAMP, "--sync-listen", f"127.0.0.1:{port}", name=f"replica{i}")
        for i, port in enumerate(ports)
    ]
    publisher = Publisher([r.sync for r in replicas], "seed-sync", connect_timeout_s=5)
    try:
        assert publisher.publish("stamp", stamp_state(1)).targets == 3  # first contact: each
        chained = publisher.publish("stamp", stamp_state(2))  # one push down the chain
        assert (chained.version, chained.targets) == (2, 3)
        assert forwarded_to(services, "replica0") == [replicas[1].sync]

        # The middle one restarts without its state: it no longer knows the trainer's lease
        # and holds no base for the next delta.
        replicas[1].process.kill()
        replicas[1].process.wait(timeout=10)
        back = services.inference(STAMP, "--sync-listen", replicas[1].sync, name="back")
        report = publisher.publish("stamp", stamp_state(3))
    finally:
        publisher.close()

    # Everyone commits version 3 within the sync, and the trainer's link carried one push: the
    # first routed past the refusing middle one to the last, and a neighbour that committed
    # the version seeded the middle one.
    assert (report.version, report.targets, report.lagging) == (3, 3, ())
    assert report.payload_bytes == chained.payload_bytes
    assert f"routing past {replicas[1].sync}: resuming the push on {replicas[2].sync}" in (
        services.log("replica0")
    )
    seeded = f"seeded {back.sync} with version 3"
    assert seeded in services.log("replica0") + services.log("replica2")
    digest = state_digest(stamp_state(3))
    for replica in (replicas[0], back, replicas[2]):
        state = replica.model_state("stamp")
        assert (state.version, state.digest, state.writer_id) == (3, digest, "seed-sync")
    assert served_version(back) == "3"


def test_a_donor_that_stops_mid_seed_is_given_up_and_the_trainer_pushes_the_replica_itself(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "4"
    ports = free_ports(3)  # in chain order: the first is the donor
    replicas = [
        services.inference(STAMP, "--sync-listen", f"127.0.0.1:{port}", name=f"replica{i}")
        for i, port in enumerate(ports[:2])
    ]
    last = ports[2]
    replicas.append(services.inference(STAMP, "--sync-listen", f"127.0.0.1:{last}", name="r2"))
    publisher = Publisher([r.sync for r in replicas], "seed-sync", connect_timeout_s=5)
    donor = replicas[0]
    try:
        publisher.publish("stamp", stamp_state(1, mb=4))
        publisher.publish("stamp", stamp_state(2, mb=4))
        # The last one restarts empty and takes pushes at 0.5 MB/s: its seed lasts about 8 s.
        replicas[2].process.kill()
        replicas[2].process.wait(timeout=10)
        back = services.inference(
            STAMP,
            *("--sync-listen", f"127.0.0.1:{last}", "--sync-max-mb-per-s", "0.5"),
            *("--sync-relay", "off"),
            name="back",
        )
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=4))

            def seeded_in_flight() -> bool:
                pending = back.model_state("stamp").pending
                return pending.version == 3 and pending.bytes_received > 0

            wait_until(seeded_in_flight, timeout=60)
            # The donor's host goes dark mid-seed: the service and its sync relay stop.
            stopped = [donor.process.pid, donor.relay_pid]
            assert stopped[1] is not None
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            try:
                report = sync.result(timeout=60)
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
    finally:
        publisher.close()
    # The seed failed once its link stayed silent, and the trainer pushed the replica itself
    # within the same sync, instead of waiting for the Seed call's deadline.
    assert (report.version, report.targets, report.lagging) == (3, 3, ())
    state = back.model_state("stamp")
    assert (state.version, state.digest) == (3, state_digest(stamp_state(3, mb=4)))
    assert f"seeding {back.sync} with version 3" in services.log("replica0")


def test_a_replica_back_while_a_sync_is_in_flight_is_brought_to_that_version_alone(
    services: Services,
) -> None:
    services.env["TEST_STAMP_MB"] = "4"
    [late_port] = free_ports(1)
    late_address = f"127.0.0.1:{late_port}"  # nothing listens there yet
    # The live one takes pushes at 0.5 MB/s: version 2's push lasts about 8 s.
    live = services.inference(
        STAMP, "--sync-max-mb-per-s", "0.5", "--sync-relay", "off", name="live"
    )
    services.start_trainer(
        STAMP,
        [live.sync, late_address],
        *("--trainer-id", "trainer", "--max-runs", "2", "--run-interval", "600"),
        *("--connect-timeout", "1"),
        name="trainer",
    )
    wait_until(lambda: f"lagging: {late_address}" in services.log("trainer"), timeout=60)

    def receiving_version_2() -> bool:
        pending = live.model_state("stamp").pending
        return pending.version == 2 and pending.bytes_received > 0

    wait_until(receiving_version_2, timeout=30)
    late = services.inference(STAMP, "--sync-listen", late_address, name="late")
    # Its catch-up falls due while version 2 is in flight: it waits for that sync and brings
    # the late one to version 2 at once (seeded by the live one), never to version 1 first.
    wait_until(lambda: late.model_state("stamp").version == 2, timeout=60)
    assert late.model_state("stamp").digest == state_digest(stamp_state(1, mb=4))
    assert live.model_state("stamp").version == 2
    commits = [line for line in services.log("late").splitlines() if "committed version" in line]
    assert len(commits) == 1 and "committed version 2" in commits[0], commits
    assert f"{late_address} caught up from {live.sync} at version 2" in services.log("trainer")


def started_pair(services: Services, relay: str) -> tuple[Inference, Inference, Sync, Sync]:
    """A donor serving version 3 of the stamp model (pushed by "tester") and a hop at version
    0, both requiring the sync token; the donor's sync plane in-process or behind its relay."""
    services.env["INFERENCE_SYNC_TOKEN"] = TOKEN
    donor = services.inference(CATALOGUE, "--sync-relay", relay, name="donor")
    hop = services.inference(CATALOGUE, "--sync-relay", "off", name="hop")
    to_donor, to_hop = Sync(donor.sync, TOKEN), Sync(hop.sync, TOKEN)
    assert to_donor.push(stamp_state(7), 3, to_donor.acquire("tester")).version == 3
    return donor, hop, to_donor, to_hop


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_seed_commits_the_served_version_on_the_hop_and_is_refused_where_a_push_would(
    services: Services, relay: str
) -> None:
    _, hop, to_donor, to_hop = started_pair(services, relay)
    served = to_donor.state()
    stale = to_hop.acquire("tester")
    to_hop.acquire("another")  # fences `stale`
    before = to_hop.state()

    # A fenced epoch on the hop: refused there exactly as a direct push under it.
    result = seed(to_donor, 3, pb.Hop(address=hop.sync, writer_epoch=stale))
    direct = refusal(to_hop, stamp_state(7), 3, stale)
    assert (direct[0], direct[1]) == (grpc.StatusCode.ABORTED.value[0], protocol.FENCED)
    assert (result.address, result.version) == (hop.sync, 0)
    assert (result.code, result.reason, result.message) == direct
    now = to_hop.state()
    assert (now.version, now.digest) == (before.version, before.digest)

    # Under the epoch held there: committed, bit-exact, as the version and writer it was.
    result = seed(to_donor, 3, pb.Hop(address=hop.sync, writer_epoch=to_hop.acquire("tester")))
    assert (result.address, result.version, result.code, result.reason) == (hop.sync, 3, 0, "")
    now = to_hop.state()
    assert (now.version, now.digest, now.writer_id) == (3, served.digest, "tester")
    assert served_version(hop) == "3"
    after = to_donor.state()
    assert (after.version, after.digest) == (served.version, served.digest)


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_seed_the_replica_cannot_start_gets_a_clear_status_and_changes_nothing(
    services: Services, relay: str
) -> None:
    donor, hop, to_donor, to_hop = started_pair(services, relay)
    served, before = to_donor.state(), to_hop.state()
    epoch = to_hop.acquire("tester")
    to_the_hop = pb.Hop(address=hop.sync, writer_epoch=epoch)

    error = seed_refusal(Sync(donor.sync), 3, to_the_hop)  # no token
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in (error.details() or "")

    error = seed_refusal(to_donor, 3, to_the_hop, model="nope")
    assert (error.code(), error_reason(error)) == (
        grpc.StatusCode.NOT_FOUND,
        protocol.MODEL_NOT_FOUND,
    )
    assert "'nope'" in (error.details() or "")

    # Never a version other than the caller expects (a stale one).
    error = seed_refusal(to_donor, 2, to_the_hop)
    assert (error.code(), error_reason(error)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        protocol.SEED_VERSION_MISMATCH,
    )
    assert "serves version 3, not 2" in (error.details() or "")

    error = seed_refusal(to_donor, 3, pb.Hop(writer_epoch=epoch))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hop's address" in (error.details() or "")

    port = donor.sync.rsplit(":", 1)[1]
    for itself in (donor.sync, f"localhost:{port}"):
        error = seed_refusal(to_donor, 3, pb.Hop(address=itself, writer_epoch=epoch))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "this replica's own sync plane" in (error.details() or "")

    error = seed_refusal(to_donor, 1, to_the_hop, model="frozen")
    assert (error.code(), error_reason(error)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        protocol.INFERENCE_ONLY_MODEL,
    )
    assert "inference-only" in (error.details() or "")

    for sync, was in ((to_donor, served), (to_hop, before)):
        now = sync.state()
        assert (now.version, now.digest) == (was.version, was.digest)
        assert not now.HasField("pending")
    for name in ("donor", "hop"):
        assert "Traceback" not in services.log(name)


def test_a_donor_whose_service_stops_behind_its_live_relay_is_given_up_within_the_sync(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    services.env["TEST_STAMP_MB"] = "2"
    ports = free_ports(2)  # in chain order: the first is the donor, behind its sync relay
    donor = services.inference(STAMP, "--sync-listen", f"127.0.0.1:{ports[0]}", name="donor")
    other = services.inference(STAMP, "--sync-listen", f"127.0.0.1:{ports[1]}", name="other")
    assert donor.relay_pid is not None
    publisher = Publisher([donor.sync, other.sync], "seed-sync", connect_timeout_s=5)
    try:
        publisher.publish("stamp", stamp_state(1, mb=2))
        publisher.publish("stamp", stamp_state(2, mb=2))
        # The other one restarts empty and takes pushes at 0.5 MB/s: its seed lasts about 4 s.
        other.process.kill()
        other.process.wait(timeout=10)
        back = services.inference(
            STAMP,
            *("--sync-listen", other.sync, "--sync-max-mb-per-s", "0.5"),
            *("--sync-relay", "off"),
            name="back",
        )
        with ThreadPoolExecutor(1) as pool, caplog.at_level("INFO", "trainer_service"):
            sync = pool.submit(publisher.publish, "stamp", stamp_state(3, mb=2))

            def seeded_in_flight() -> bool:
                pending = back.model_state("stamp").pending
                return pending.version == 3 and pending.bytes_received > 0

            wait_until(seeded_in_flight, timeout=60)
            # The donor's service stops mid-seed; its relay lives on and answers the trainer's
            # pings, so only the relay can tell that the Seed it passed on will never end.
            os.kill(donor.process.pid, signal.SIGSTOP)
            try:
                report = sync.result(timeout=60)  # the push deadline is 600 s
            finally:
                os.kill(donor.process.pid, signal.SIGCONT)
    finally:
        publisher.close()
    # The Seed failed UNAVAILABLE once the service behind the relay stopped answering it, and
    # the trainer pushed the replica itself within the same sync.
    assert (report.version, report.targets, report.lagging) == (3, 2, ())
    digest = state_digest(stamp_state(3, mb=2))
    state = back.model_state("stamp")
    assert (state.version, state.digest, state.writer_id) == (3, digest, "seed-sync")
    assert served_version(back) == "3"
    assert f"seeding {back.sync} with version 3" in services.log("donor")
    assert f"could not catch {back.sync} up to version 3 (UNAVAILABLE" in caplog.text
    assert "the inference service stopped answering the sync relay" in services.log("donor")
    # The donor serves on, unchanged, once it runs again: its relay reaches it anew.
    now = donor.model_state("stamp")
    assert (now.version, now.digest) == (3, digest)


def test_a_call_the_relay_passes_to_a_stopped_service_fails_unavailable_not_at_its_deadline(
    services: Services,
) -> None:
    donor, _, to_donor, _ = started_pair(services, "on")
    served = to_donor.state()
    os.kill(donor.process.pid, signal.SIGSTOP)  # its relay lives on
    try:
        request = pb.GetModelRequest(model_name="stamp")
        with pytest.raises(grpc.RpcError) as refused:
            to_donor.stub().GetModel(request, timeout=30, metadata=to_donor.metadata)
    finally:
        os.kill(donor.process.pid, signal.SIGCONT)
    error = refused.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped answering the sync relay" in (error.details() or "")
    # Running again, it answers through the same relay, unchanged.
    now = to_donor.state()
    assert (now.version, now.digest, now.writer_id) == (served.version, served.digest, "tester")
