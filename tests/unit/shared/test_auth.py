"""The bearer-token check both services' planes make before any handler runs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import grpc
import pytest

from shared.errors import ConfigurationError
from shared.grpc.auth import MAX_TOKEN_CHARS, TlsFiles, TokenAuthInterceptor, checked_token
from tests.integration.pki import make_pki


class Call(NamedTuple):  # what grpc.HandlerCallDetails carries
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


CHECK = TokenAuthInterceptor("s3cret", "data plane", weaker="other")
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_scheme_is_taken_in_any_case(scheme: str) -> None:
    assert CHECK.refusal(Call(INFER, (("authorization", f"{scheme} s3cret"),))) is None


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token for the data plane"),
        (
            (("authorization", "Basic czNjcmV0"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "no bearer token for the data plane",
        ),
        (
            (("authorization", "bearer wrong"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid bearer token for the data plane",
        ),
        (
            (("authorization", "Bearer other"),),
            grpc.StatusCode.PERMISSION_DENIED,
            "this token is not allowed on the data plane",
        ),
        (
            (("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")),
            grpc.StatusCode.UNAUTHENTICATED,
            "2 authorization headers for the data plane",
        ),
    ],
    ids=["none", "another-scheme", "wrong", "weaker", "twice"],
)
def test_a_refusal_says_what_was_wrong(
    metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode, message: str
) -> None:
    refusal = CHECK.refusal(Call(INFER, metadata))
    assert refusal is not None
    assert refusal[0] == code and refusal[1].startswith(message)


def test_a_certificate_and_a_key_that_do_not_match_are_refused_naming_both(tmp_path: Path) -> None:
    """gRPC reports a mismatched pair only as a port it cannot bind (a server) or a handshake
    that fails at every call (a client); the check finds it at start."""
    pki = make_pki(tmp_path)
    TlsFiles(pki / "client.pem", pki / "client.key", pki / "ca.pem").check()  # a pair
    mismatched = TlsFiles(pki / "client.pem", pki / "server.key")
    with pytest.raises(ConfigurationError, match=r"server.key is not the key of .*client.pem"):
        mismatched.check()
    with pytest.raises(ConfigurationError, match="is not the key of"):
        mismatched.server_credentials()


def test_a_token_too_long_for_a_calls_metadata_is_refused() -> None:
    assert checked_token("t" * MAX_TOKEN_CHARS) == "t" * MAX_TOKEN_CHARS
    with pytest.raises(ConfigurationError, match="4097 characters long; at most 4096"):
        checked_token("t" * (MAX_TOKEN_CHARS + 1))
