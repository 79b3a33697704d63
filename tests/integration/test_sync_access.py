"""Who may use the sync plane, and how much of it: callers without the sync token take none of
the writers' calls (health has a small budget of its own, and refusals wait for nothing), a
client CA shared with the data plane does not authenticate the sync plane, and the two planes
cannot share a token. With the sync relay and without it."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from shared.grpc.auth import TlsFiles
from shared.grpc.channel import open_channel
from shared.grpc.limits import HEALTH_CALLS, LOOKUP_CALLS, REQUEST_WAIT_S, WATCH_CALLS
from shared.grpc.options import DATA_MAX_MESSAGE_BYTES, SYNC_MAX_MESSAGE_BYTES
from tests.integration.conftest import ROOT, Inference, Services, wait_until
from tests.integration.pki import make_ca, make_cert, make_server_cert
from tests.integration.stamp_writer import StampWriter

STAMP = "tests.integration.apps:stamp"
MB = 1
TOKEN = "sync-secret"
WRITERS = 8  # --max-concurrent-pushes' default
GET_MODEL = "/weightsync.v1.WeightSync/GetModel"
ROLLBACK = "/weightsync.v1.WeightSync/Rollback"
GET_STAMP = pb.GetModelRequest(model_name="stamp")
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(params=["on", "off"], ids=["relay", "in-process"])
def relay(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


def start(services: Services, relay: str, *extra: str) -> Inference:
    services.env.update(INFERENCE_SYNC_TOKEN=TOKEN, TEST_STAMP_MB=str(MB))
    return services.inference(STAMP, "--sync-relay", relay, *extra)


def stalled(release: threading.Event, request: bytes = b"") -> Iterator[bytes]:
    """A request stream that sends nothing until `release` is set."""
    release.wait(120)
    yield request


def health_check(channel: grpc.Channel) -> int | grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return status


def test_callers_without_the_token_take_none_of_the_writers_calls(
    services: Services, relay: str
) -> None:
    inference = start(services, relay)
    anonymous = grpc.insecure_channel(inference.sync)
    health = health_pb2_grpc.HealthStub(anonymous)
    watchers = [health.Watch(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(WRITERS)]
    answers: list[object] = []
    for watch in watchers:
        try:
            answers.append(next(watch).status)
        except grpc.RpcError as error:
            answers.append((error.code(), error.details()))
    full = (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the sync plane is at its limit of {WATCH_CALLS} health Watch streams at once; retry "
        "later",
    )
    assert sorted(answers, key=str) == sorted(
        [SERVING] * WATCH_CALLS + [full] * (WRITERS - WATCH_CALLS), key=str
    )
    # Streams held open leave the checks their own slots.
    assert health_check(anonymous) == SERVING

    # Calls without the token that never send their request are refused at once, holding nothing.
    release = threading.Event()
    get_model = anonymous.stream_unary(GET_MODEL, request_serializer=None)
    try:
        calls = [get_model.future(stalled(release), timeout=120) for _ in range(2 * WRITERS)]
        for call in calls:
            refusal = call.exception(timeout=30)
            assert isinstance(refusal, grpc.RpcError)
            assert refusal.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "missing bearer token for the sync plane" in (refusal.details() or "")
    finally:
        release.set()

    # With the watchers still open, a writer gets every call it needs.
    writer = StampWriter(open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, token=TOKEN), MB)
    model = writer.stub.GetModel(pb.GetModelRequest(model_name="stamp"), timeout=10)
    assert model.version == 0
    writer.acquire()
    digest = writer.push(1.0, 1)
    served = inference.model_state("stamp", token=TOKEN)
    assert (served.version, served.digest) == (1, digest)

    # The watchers that were let in still watch; once they leave, others may watch again.
    refused = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        next(refused)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    for watch in watchers:
        watch.cancel()

    def watched() -> bool:
        try:
            return next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING
        except grpc.RpcError:
            return False

    wait_until(watched, timeout=30)


def test_the_writers_budget_counts_the_calls_past_authentication_and_lookups_have_their_own(
    services: Services, relay: str
) -> None:
    inference = start(services, relay, "--max-concurrent-pushes", "1")
    channel = open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, token=TOKEN)
    stub = pb_grpc.WeightSyncStub(channel)
    rollback = pb.RollbackRequest(model_name="stamp", to_version=99)  # never committed
    release = threading.Event()
    held = [hold(channel, ROLLBACK, release, rollback)]
    try:

        def refused() -> bool:
            if held[-1].done():  # a probe below took the one call first: hold it again
                assert held[-1].code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                held.append(hold(channel, ROLLBACK, release, rollback))
                return False
            try:
                stub.Rollback(rollback, timeout=10)
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return False  # admitted: the held call has not reached the server yet
                assert error.details() == (
                    "the sync plane is at its limit of 1 calls at once; retry later"
                )
                return not held[-1].done()
            raise AssertionError("a rollback to a version never committed succeeded")

        wait_until(refused, timeout=30)
        # A lookup takes a slot of its own: the replica still says what it serves.
        assert stub.GetModel(GET_STAMP, timeout=10).version == 0
        assert [
            m.model_name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        ] == ["stamp"]
        # Health and callers without the token are still answered: they wait for no writer.
        anonymous = grpc.insecure_channel(inference.sync)
        assert health_check(anonymous) == SERVING
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.WeightSyncStub(anonymous).GetModel(GET_STAMP, timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        release.set()
    with pytest.raises(grpc.RpcError) as caught:
        held[-1].result(timeout=30)
    assert caught.value.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED  # admitted, answered

    # Lookups are bounded too, and filling theirs leaves the writers' slot alone.
    release = threading.Event()
    lookups = [hold(channel, GET_MODEL, release, GET_STAMP) for _ in range(LOOKUP_CALLS)]
    try:

        def lookups_full() -> bool:
            try:
                stub.GetModel(GET_STAMP, timeout=10)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error.details() == (
                    f"the sync plane is at its limit of {LOOKUP_CALLS} lookups at once; retry later"
                )
                return True
            return False

        wait_until(lookups_full, timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rollback(rollback, timeout=10)
        assert caught.value.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
    # The held lookups were admitted (a probe may have taken a slot first: that one is refused).
    answered = [call for call in lookups if call.exception(timeout=30) is None]
    assert answered and all(call.result().version == 0 for call in answered)
    assert stub.GetModel(GET_STAMP, timeout=10).version == 0  # their calls were given back


def hold(channel: grpc.Channel, method: str, release: threading.Event, request: Any) -> grpc.Future:
    """A call to `method` that sends `request` once `release` is set: it holds its slot."""
    # Both answer a ModelState.
    call = channel.stream_unary(
        method, request_serializer=None, response_deserializer=pb.ModelState.FromString
    )
    return call.future(stalled(release, request.SerializeToString()), timeout=120)


def run_inference(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    """Start the inference service with `args` and wait for it to exit (it must refuse)."""
    command = [sys.executable, "-m", "inference_service", "--models", STAMP, "--device", "cpu"]
    command += ["--listen", "127.0.0.1:0", "--metrics-listen", "off", *args]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=services.env, timeout=60
    )


def test_a_client_ca_shared_with_the_data_plane_does_not_authenticate_the_sync_plane(
    services: Services, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    ca = make_ca(pki, "ca")
    cert, key = make_server_cert(pki, ca)
    refused = run_inference(
        services,
        *("--sync-listen", "0.0.0.0:0", "--tls-cert", str(cert), "--tls-key", str(key)),
        *("--tls-client-ca", str(ca)),
    )
    assert refused.returncode == 2, refused.stderr
    assert "with no authentication: set INFERENCE_SYNC_TOKEN" in refused.stderr
    assert "a --tls-client-ca shared with the data plane would let any data-plane client push" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr


def test_a_sync_plane_client_ca_of_its_own_admits_its_clients_only(
    services: Services, tmp_path: Path, relay: str
) -> None:
    pki = tmp_path / "pki"
    data_ca, sync_ca = make_ca(pki, "data-ca"), make_ca(pki, "sync-ca")
    server_cert, server_key = make_server_cert(pki, data_ca)
    data_client = TlsFiles(*make_cert(pki, "data-client", data_ca), data_ca)
    trainer = TlsFiles(*make_cert(pki, "trainer", sync_ca), data_ca)
    services.env.update(
        TEST_STAMP_MB=str(MB),
        INFERENCE_TLS_CERT=str(server_cert),
        INFERENCE_TLS_KEY=str(server_key),
        INFERENCE_TLS_CLIENT_CA=str(data_ca),
        INFERENCE_TLS_SYNC_CLIENT_CA=str(sync_ca),
    )
    # Beyond loopback and with no token: the sync plane's own CA is its authentication.
    inference = services.inference(STAMP, "--sync-relay", relay, "--sync-listen", "0.0.0.0:0")
    request = pb.GetModelRequest(model_name="stamp")

    as_data_client = open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, tls=data_client)
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.WeightSyncStub(as_data_client).GetModel(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # its certificate is refused

    writer = StampWriter(open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, tls=trainer), MB)
    assert writer.stub.GetModel(request, timeout=10).version == 0
    writer.acquire()
    digest = writer.push(2.0, 1)
    served = writer.stub.GetModel(request, timeout=10)
    assert (served.version, served.digest) == (1, digest)

    data = open_channel(inference.data, DATA_MAX_MESSAGE_BYTES, tls=data_client)
    ready = oip.ServerReadyRequest()
    assert oip_grpc.GRPCInferenceServiceStub(data).ServerReady(ready, timeout=10).ready
    as_trainer = open_channel(inference.data, DATA_MAX_MESSAGE_BYTES, tls=trainer)
    with pytest.raises(grpc.RpcError) as caught:
        oip_grpc.GRPCInferenceServiceStub(as_trainer).ServerReady(ready, timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # the data plane keeps its CA


def test_the_same_token_for_both_planes_is_refused_at_start(services: Services) -> None:
    services.env.update(INFERENCE_SYNC_TOKEN="shared", INFERENCE_DATA_TOKEN="shared")
    refused = run_inference(services, "--sync-listen", "127.0.0.1:0")
    assert refused.returncode == 2, refused.stderr
    assert "INFERENCE_SYNC_TOKEN and INFERENCE_DATA_TOKEN are the same" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_unary_calls_that_never_send_their_request_are_ended_and_free_their_slots(
    services: Services, relay: str
) -> None:
    inference = start(services, relay)
    never = threading.Event()
    anonymous = grpc.insecure_channel(inference.sync)
    channel = open_channel(inference.sync, SYNC_MAX_MESSAGE_BYTES, token=TOKEN)
    # Every slot: the writers' (AcquireWriter), the lookups' (GetModel), and health's.
    quiet = [
        hold(channel, "/weightsync.v1.WeightSync/AcquireWriter", never, GET_STAMP)
        for _ in range(WRITERS)
    ]
    quiet += [hold(channel, GET_MODEL, never, GET_STAMP) for _ in range(LOOKUP_CALLS)]
    quiet += [
        anonymous.stream_unary("/grpc.health.v1.Health/Check", None, None).future(
            stalled(never), timeout=120
        )
        for _ in range(HEALTH_CALLS)
    ]
    try:
        # Each quiet call is ended by the service, well before its own deadline.
        wait_until(lambda: all(call.done() for call in quiet), timeout=60)
        for call in quiet:
            assert call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert call.details() == (
                f"the call sent no request within {REQUEST_WAIT_S:g}s: the sync plane ended it "
                "to free its slot"
            )
        stub = pb_grpc.WeightSyncStub(channel)
        assert stub.GetModel(GET_STAMP, timeout=10).version == 0
        lease = stub.AcquireWriter(
            pb.AcquireWriterRequest(model_name="stamp", writer_id="tester"), timeout=10
        )
        assert lease.epoch == 1
        assert health_check(anonymous) == SERVING
    finally:
        never.set()
        channel.close()
        anonymous.close()
