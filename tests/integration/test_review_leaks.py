"""Review: what a pair running for days accumulates under ordinary and hostile client churn.

Each test drives one long-lived process through many repetitions of one event and checks that
nothing grows with the number of repetitions (or that the event leaves no trace it should not).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc
from shared.grpc.channel import open_channel
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.conftest import Services, wait_until
from tests.integration.stamp_writer import StampWriter, stamp_state

STAMP = "tests.integration.apps:stamp"


def drop_watch(address: str, service: str = "") -> None:
    """Open a health Watch on `address`, read its first answer, and drop it (the client goes
    away, as a probe that times out or a load balancer that reconnects does)."""
    with grpc.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        next(stream)
        stream.cancel()


def test_dropped_health_watches_on_the_sync_plane_log_no_error_tracebacks(
    services: Services,
) -> None:
    """docs/operations.md: a Watch keeps nothing once it ends. A client dropping a health Watch
    is an ordinary event (probes with timeouts, reconnecting balancers); through the sync relay
    (`--sync-relay on`, what hosts with 4+ CPUs run) every few drops leave an ERROR line and a
    15-line grpc traceback ("Exception iterating requests!") in the service's log, so the log
    of a service probed for days fills with tracebacks that are no failure of its own."""
    services.env["TEST_STAMP_MB"] = "1"
    inference = services.inference(STAMP)
    for _ in range(200):
        drop_watch(inference.sync)
    time.sleep(1.0)
    log = services.log("inference")
    tracebacks = log.count("Traceback (most recent call last)")
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert tracebacks == 0 and not errors, (
        f"200 dropped sync-plane Watch streams logged {tracebacks} tracebacks; "
        f"first ERROR lines: {errors[:3]}"
    )


def test_list_versions_while_history_is_pruned_never_fails_internal(
    services: Services, tmp_path: Path
) -> None:
    """docs/operations.md / configuration.md: `--history N` keeps the last N committed versions
    in --state-dir and `weightsync-admin versions` lists them. Pruning runs in the background
    after each commit; a ListVersions that lists a version file and then stats it after the
    pruner removed it fails with INTERNAL ("internal server error"; the server log shows a
    FileNotFoundError from persistence.size_bytes). PRODUCT.md section 6: clear statuses, never
    an internal error for an ordinary call. An operator's dashboard polling `versions` while a
    trainer pushes hits it."""
    services.env["TEST_STAMP_MB"] = "1"
    inference = services.inference(STAMP, "--state-dir", str(tmp_path / "state"), "--history", "1")
    writer = StampWriter(open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES), 1)
    writer.acquire()
    state = stamp_state(1, 2.0)
    payload = Payload.of(list(state.items()))
    chunks, digest = list(payload.chunks()), state_digest(state)
    failures: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        with grpc.insecure_channel(inference.sync) as channel:
            stub = sync_grpc.WeightSyncStub(channel)
            while not stop.is_set():
                try:
                    stub.ListVersions(sync_pb.ListVersionsRequest(model_name="stamp"), timeout=5)
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")

    pollers = [threading.Thread(target=poll) for _ in range(3)]
    for thread in pollers:
        thread.start()
    try:
        deadline = time.monotonic() + 25
        version = 0
        while time.monotonic() < deadline and not failures:
            version += 1
            writer.push_payload(chunks, payload.nbytes, version, digest)
    finally:
        stop.set()
        for thread in pollers:
            thread.join(timeout=10)
    assert not failures, f"ListVersions failed during {version} pushes: {failures[:3]}"


def test_repeated_rollbacks_do_not_grow_the_recorded_writer_without_bound(
    services: Services, tmp_path: Path
) -> None:
    """docs/operations.md: "A rollback is itself a commit: the stored weights of version 12 are
    pushed ... and become the next version." Each rollback records its writer as
    "rollback to N of <writer of N>", so rolling back to a version that was itself a rollback
    nests the whole previous string: after k such rollbacks the writer id (logged with every
    commit, stored in every history file's metadata, answered by GetModel / ListVersions) is
    k times as long, with no bound, for a service that is rolled back now and then for days."""
    services.env["TEST_STAMP_MB"] = "1"
    inference = services.inference(STAMP, "--state-dir", str(tmp_path / "state"), "--history", "3")
    writer = StampWriter(open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES), 1)
    writer.acquire()
    writer.push(1.0, 1)
    writer.push(2.0, 2)
    with grpc.insecure_channel(inference.sync) as channel:
        stub = sync_grpc.WeightSyncStub(channel)

        def kept() -> list[int]:
            listed = stub.ListVersions(sync_pb.ListVersionsRequest(model_name="stamp"), timeout=5)
            return sorted(v.version for v in listed.versions)

        serving = 2
        for _ in range(30):
            target = serving - 1
            wait_until(lambda t=target: t in kept(), timeout=10)
            state = stub.Rollback(
                sync_pb.RollbackRequest(model_name="stamp", to_version=target), timeout=10
            )
            serving = state.version
        writer_id = inference.model_state("stamp").writer_id
    assert len(writer_id) <= 200, (
        f"after 30 rollbacks the writer id is {len(writer_id)} chars: {writer_id[:160]}..."
    )
