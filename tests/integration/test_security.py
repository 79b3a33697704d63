"""Auth on both planes: bearer tokens, TLS and mutual TLS, and the open-sync-plane guard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as pb_grpc
from tests.integration.conftest import ROOT, Services, wait_until

STAMP = "tests.integration.apps:stamp"
PAIR = "tests.integration.apps:pair"


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = caught.value.code()
    return code


def test_tokens_guard_each_plane(services: Services) -> None:
    services.env.update(INFERENCE_SYNC_TOKEN="sync-secret", INFERENCE_DATA_TOKEN="data-secret")
    inference = services.inference(STAMP)
    sync = pb_grpc.WeightSyncStub(grpc.insecure_channel(inference.sync))
    request = pb.GetModelRequest(model_name="stamp")
    assert code_of(lambda: sync.GetModel(request, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer nope"),)
    assert code_of(lambda: sync.GetModel(request, timeout=5, metadata=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    data_token = (("authorization", "Bearer data-secret"),)
    assert code_of(lambda: sync.GetModel(request, timeout=5, metadata=data_token)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    twice = (*wrong, ("authorization", "Bearer sync-secret"))  # which would count is a guess
    assert code_of(lambda: sync.GetModel(request, timeout=5, metadata=twice)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    header = pb.PushRequest(header=pb.PushHeader(model_name="stamp", version=1, payload_bytes=8))
    assert code_of(lambda: sync.Push(iter([header]), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        sync.GetModel(
            request, timeout=5, metadata=(("authorization", "Bearer sync-secret"),)
        ).version
        == 0
    )

    data = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inference.data))
    ready = oip.ServerReadyRequest()
    assert code_of(lambda: data.ServerReady(ready, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    assert data.ServerReady(ready, timeout=5, metadata=data_token).ready
    stream = oip.ModelInferRequest(model_name="stamp")
    assert code_of(lambda: list(data.ModelStreamInfer(iter([stream]), timeout=5))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(inference.data))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )  # probes need no token on either plane

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(inference.sync))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )

    services.env["TRAINER_SYNC_TOKEN"] = "sync-secret"
    trainer = services.trainer(STAMP, [inference], "--max-runs", "2")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    assert inference.model_state("stamp", token="sync-secret").version == 3


def test_an_open_sync_plane_beyond_loopback_needs_an_explicit_flag(services: Services) -> None:
    args = [
        sys.executable,
        "-m",
        "inference_service",
        "--models",
        STAMP,
        "--listen",
        "127.0.0.1:0",
        "--sync-listen",
        "0.0.0.0:0",
        "--metrics-listen",
        "off",
    ]
    refused = subprocess.run(
        args, capture_output=True, text=True, cwd=ROOT, env=services.env, timeout=60
    )
    assert refused.returncode == 2
    assert "with no authentication: set INFERENCE_SYNC_TOKEN" in refused.stderr


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        ext = d / f"{name}.ext"
        ext.write_text(extra + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            str(d / f"{name}.pem"),
            *(["-extfile", str(ext)] if extra else []),
        )
    return d


def test_mutual_tls_on_the_sync_plane(services: Services, pki: Path) -> None:
    services.env.update(
        INFERENCE_TLS_CERT=str(pki / "server.pem"),
        INFERENCE_TLS_KEY=str(pki / "server.key"),
        INFERENCE_TLS_CLIENT_CA=str(pki / "ca.pem"),
    )
    inference = services.inference(STAMP, tls=pki)
    services.env.update(TRAINER_TLS_CA=str(pki / "ca.pem"))
    anonymous = services.trainer(STAMP, [inference], "--max-runs", "1", name="anonymous")
    wait_until(lambda: "initial sync failed" in services.log("anonymous"), timeout=60)
    anonymous.kill()
    assert inference.model_state("stamp").version == 0
    services.env.update(
        TRAINER_TLS_CERT=str(pki / "client.pem"), TRAINER_TLS_KEY=str(pki / "client.key")
    )
    trainer = services.trainer(STAMP, [inference], "--max-runs", "2")
    assert trainer.wait(timeout=120) == 0, services.log("trainer")
    assert inference.model_state("stamp").version == 3
