"""`InferenceClient` opens its channel with the one channel factory (shared/grpc/channel.py): a
data plane that wants a token and TLS is reached as any other client reaches it, verifying the
name the user gave, and every call carries the client's deadline."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from inference_service.client import InferenceClient
from shared.grpc.auth import TlsFiles
from tests.integration.conftest import Services
from tests.integration.pki import make_ca, make_cert

SLEEPY = "tests.integration.apps:sleepy"  # sleeps as many seconds as its first input says
TOKEN = "data-secret"


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_a_data_plane_with_a_token_and_tls_is_reached_verifying_the_name_given(
    services: Services, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    ca = make_ca(pki, "ca")
    cert, key = make_cert(pki, "server", ca, "DNS:localhost")  # no IP: 127.0.0.1 is not it
    services.env.update(
        INFERENCE_DATA_TOKEN=TOKEN, INFERENCE_TLS_CERT=str(cert), INFERENCE_TLS_KEY=str(key)
    )
    inference = services.inference(SLEEPY)
    verify = TlsFiles(ca=ca)
    x = torch.tensor([[0.0], [1.5e-7], [-3.25]])  # sleeps 0 s

    with InferenceClient(
        inference.data, token=TOKEN, tls=verify, server_name="localhost"
    ) as client:
        assert client.server_ready()
        result = client.infer("sleepy", {"x": x})
        assert result.model_name == "sleepy"
        assert torch.equal(result.outputs["y"], x)  # times a scale of 1: bit-exact

    # The same, but verifying the address dialled: the certificate does not name it.
    with InferenceClient(inference.data, token=TOKEN, tls=verify) as by_address:
        assert rpc_error(by_address.server_ready).code() is grpc.StatusCode.UNAVAILABLE

    # The same, without the token: refused by the data plane, with what to send.
    with InferenceClient(inference.data, tls=verify, server_name="localhost") as anonymous:
        error = rpc_error(anonymous.server_ready)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == (
            "missing bearer token for the data plane: send 'authorization: Bearer <token>'"
        )


def test_every_call_carries_the_clients_deadline(services: Services) -> None:
    inference = services.inference(SLEEPY)
    one_second = torch.ones(1, 1)  # sleeps 1 s
    with InferenceClient(inference.data) as patient:  # 10 s
        assert patient.infer("sleepy", {"x": one_second}).outputs["y"].tolist() == [[1.0]]
    with InferenceClient(inference.data, timeout_s=0.2) as hasty:
        error = rpc_error(lambda: hasty.infer("sleepy", {"x": one_second}))
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.details() == "Deadline Exceeded"
