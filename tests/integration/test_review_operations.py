"""Review of the operator's surfaces from outside: health (Check and Watch) on every plane,
the metrics endpoint, the admin tool's rollback, drain on SIGTERM. Each test here failed on
the tree it was written against, because of the defect its docstring names."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import ROOT, Services, wait_until

STAMP = "tests.integration.apps:stamp"
EXPERIENCE = "tests.integration.experience_apps:steps"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MiB = 1 << 20


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _rss_mib(pid: int) -> float:
    return _status(pid, "VmRSS") / 1024


def _threads(pid: int) -> int:
    return _status(pid, "Threads")


def _watch(address: str, service: str = "", timeout: float = 25.0) -> grpc.Future:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 4 * MiB)])
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)


def _statuses_into(watch: grpc.Future, into: queue.Queue[object]) -> threading.Thread:
    def read() -> None:
        try:
            for answer in watch:
                into.put(answer.status)
        except grpc.RpcError as error:
            into.put(error.code())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_data_plane_health_watcher_sees_the_drain_after_another_watcher_went_away(
    services: Services,
) -> None:
    """docs/operations.md: "SIGTERM drains both services: health turns NOT_SERVING". gRPC's
    client-side health checking (a load balancer's, Envoy's) holds a Watch stream on the data
    plane and stops sending once it reads NOT_SERVING. Once any one watcher of a service goes
    away, the data plane's health (grpc_health's aio servicer) forgets the others: they are
    never told of the drain, and keep sending requests that the draining server refuses until
    --grace ends their stream."""
    inference = services.inference(STAMP, "--grace", "15")
    leaving = _watch(inference.data)
    staying = _watch(inference.data)
    assert next(leaving).status == SERVING
    assert next(staying).status == SERVING
    leaving.cancel()  # one client (a probe, a replica of the balancer) goes away
    time.sleep(0.5)

    seen: queue.Queue[object] = queue.Queue()
    _statuses_into(staying, seen)
    inference.process.send_signal(signal.SIGTERM)
    try:
        first = seen.get(timeout=5)
    except queue.Empty:
        first = "nothing within 5 s of SIGTERM"
    finally:
        staying.cancel()  # let the drain end now rather than after --grace
    assert first == NOT_SERVING, first
    assert inference.process.wait(timeout=30) == 0


def test_open_health_watches_end_at_the_drain_instead_of_holding_it(services: Services) -> None:
    """A Watch stream left open (a balancer's, on either plane) hears NOT_SERVING at SIGTERM
    and then ends: it does not hold the drain for the whole --grace."""
    inference = services.inference(STAMP, "--grace", "60")
    watches = [_watch(inference.data), _watch(inference.sync)]
    assert [next(w).status for w in watches] == [SERVING, SERVING]
    started = time.monotonic()
    inference.process.send_signal(signal.SIGTERM)
    for watch in watches:
        assert [r.status for r in watch] == [NOT_SERVING]  # and the stream ended
    assert inference.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 30  # well inside the grace of 60 s


def _watch_unknown_services(address: str, calls: int, name_bytes: int) -> None:
    """Watch `calls` services nobody serves, one at a time, each under a fresh name of about
    `name_bytes`, and go away after the first answer (SERVICE_UNKNOWN)."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 4 * MiB)])
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(calls):
        name = uuid.uuid4().hex + "x" * name_bytes
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
    channel.close()


def _growth_after_unknown_watches(address: str, pid: int) -> float:
    _watch_unknown_services(address, 10, MiB)  # warm up whatever grows once
    time.sleep(1)
    before = _rss_mib(pid)
    _watch_unknown_services(address, 150, MiB)
    time.sleep(1)
    return _rss_mib(pid) - before


def test_health_watches_of_unknown_services_on_the_sync_plane_leave_nothing_behind(
    services: Services,
) -> None:
    """docs/security.md: "Health checks stay open so orchestrators can probe them" and the
    sync plane bounds health calls to 4 at once, so that callers without the token "take
    nothing from writers". Yet every Watch of a service name the plane does not serve leaves
    that name behind in the serving process for good (grpc_health's threaded servicer keeps an
    empty set of watchers per name): an anonymous client, one call at a time, grows the
    inference service's memory without bound (about 1 MiB a call with 1 MiB names; the sync
    plane takes 16 MiB messages)."""
    inference = services.inference(STAMP)
    grown = _growth_after_unknown_watches(inference.sync, inference.process.pid)
    assert grown < 50, f"150 Watch calls that ended left {grown:.0f} MiB behind"


def test_health_watches_of_unknown_services_on_the_experience_plane_leave_nothing_behind(
    services: Services,
) -> None:
    """The trainer's experience plane serves the same open health service (agents and
    orchestrators probe it without a token): the same anonymous loop grows the trainer
    process's memory without bound."""
    address = services.start_experience_trainer(EXPERIENCE, ["127.0.0.1:1"])
    trainer = services.processes[-1]
    grown = _growth_after_unknown_watches(address, trainer.pid)
    assert grown < 50, f"150 Watch calls that ended left {grown:.0f} MiB behind"


def test_idle_connections_to_the_metrics_endpoint_do_not_each_take_a_thread_for_good(
    services: Services,
) -> None:
    """The metrics endpoint is open (no token; compose listens on 0.0.0.0:9101) and lives in
    the serving process. Every connection to it that sends half a request and then nothing
    holds a thread of the inference service for as long as the client keeps it open: no read
    timeout, no bound on connections. A client opening connections exhausts the process's
    threads (its gRPC servers and torch need them), where any serious HTTP server bounds
    connections or drops idle ones."""
    inference = services.inference(STAMP)
    port = int(inference.metrics_url.rsplit(":", 1)[1].split("/")[0])
    grown = _threads_held_by_idle_connections(port, inference.process.pid)
    assert grown < 100, f"300 idle metrics connections hold {grown} more threads"


def test_idle_connections_to_the_trainer_metrics_endpoint_do_not_each_take_a_thread(
    services: Services,
) -> None:
    """The trainer's metrics endpoint (compose: 0.0.0.0:9102) is the same server: each idle
    connection holds a thread of the training process for as long as the client likes."""
    inference = services.inference(STAMP)
    trainer = services.trainer(STAMP, [inference], "--max-runs", "0")
    found: list[str] = []

    def port_logged() -> bool:
        found[:] = re.findall(r"metrics on port (\d+)", services.log("trainer"))
        return bool(found)

    wait_until(port_logged, timeout=60)
    grown = _threads_held_by_idle_connections(int(found[0]), trainer.pid)
    assert grown < 100, f"300 idle metrics connections hold {grown} more threads"


def _threads_held_by_idle_connections(port: int, pid: int) -> int:
    """How many more threads `pid` runs while 300 connections to its metrics port each send
    half a request line and then nothing, 3 s on."""
    before = _threads(pid)
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            held.append(connection)
        time.sleep(3)
        grown = _threads(pid) - before
    finally:
        for connection in held:
            connection.close()
    return grown


def _admin(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inference_service.admin", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=services.env,
        timeout=60,
    )


def test_rollback_to_a_damaged_stored_version_is_not_blamed_on_the_caller(
    services: Services, tmp_path: Path
) -> None:
    """docs/status-codes.md names INVALID_ARGUMENT for bad input, and gRPC defines it as an
    argument that is problematic whatever the state of the system. `weightsync-admin rollback
    stamp --to 2` is a good argument: version 2 is listed by `versions` as kept. When its
    file under --state-dir is damaged, the rollback is answered INVALID_ARGUMENT "digest
    mismatch ... the weights received hash to ...", as if the operator had sent bad weights.
    Stored data found corrupt is DATA_LOSS (or at least a refusal that names the stored file
    as damaged)."""
    state = tmp_path / "state"
    inference = services.inference(STAMP, "--state-dir", str(state))
    trainer = services.trainer(STAMP, [inference], "--max-runs", "3")
    assert trainer.wait(timeout=120) == 0
    served = inference.model_state("stamp")
    stored = state / "models" / "stamp" / "000000000002.safetensors"
    damaged = bytearray(stored.read_bytes())
    damaged[-100] ^= 0xFF  # one flipped byte in the tensor data, the header intact
    stored.write_bytes(bytes(damaged))

    listed = _admin(services, "--sync", inference.sync, "versions", "stamp")
    assert listed.returncode == 0 and "\n  2\t" in "\n" + listed.stdout, listed.stdout
    done = _admin(services, "--sync", inference.sync, "rollback", "stamp", "--to", "2")
    assert done.returncode == 1
    after = inference.model_state("stamp")
    assert (after.version, after.digest) == (served.version, served.digest)
    assert not done.stderr.startswith("INVALID_ARGUMENT"), done.stderr
    assert "received" not in done.stderr, done.stderr


def test_rollback_of_an_inference_only_model_says_it_takes_no_pushes(
    services: Services, tmp_path: Path
) -> None:
    """docs/operations.md: "A rollback is itself a commit: the stored weights ... are pushed
    through the same checks"; docs/status-codes.md: a push to an inference-only model is
    FAILED_PRECONDITION (`error-reason: inference-only-model`). `weightsync-admin rollback
    frozen --to 1` on such a model is answered NOT_FOUND "version 1 is not on disk (kept:
    none)" instead, which tells the operator to look for a missing file rather than that
    the model never takes weights."""
    import safetensors.torch

    from shared.gen.weightsync.v1 import weightsync_pb2 as pb
    from tests.integration.apps import MLP

    pretrained = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(MLP().state_dict(), pretrained)
    services.env["TEST_PRETRAINED"] = str(pretrained)
    inference = services.inference(
        "tests.integration.apps:pair", "--state-dir", str(tmp_path / "state")
    )
    try:
        inference.sync_stub().Rollback(
            pb.RollbackRequest(model_name="frozen", to_version=1), timeout=10
        )
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        trailers = dict(error.trailing_metadata() or ())
    else:
        raise AssertionError("a rollback of an inference-only model was accepted")
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
    assert trailers.get("error-reason") == "inference-only-model", trailers
