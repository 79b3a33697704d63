"""The bearer-token check both services' planes make before any handler runs."""

from __future__ import annotations

from typing import NamedTuple

import grpc
import pytest

from shared.grpc.auth import TokenAuthInterceptor


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
