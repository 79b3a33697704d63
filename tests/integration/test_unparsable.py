"""Requests that are not protobuf at all, on both planes: INVALID_ARGUMENT naming the message
they should have been (grpcio alone answers UNKNOWN or INTERNAL), and the served weights stay as
they were."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.integration.catalogue import Bench, assert_untouched, serving_bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    yield from serving_bench(tmp_path_factory.mktemp("unparsable"))


GARBAGE = b"\xff\xff\xff\xff"  # field 31, wire type 7: no protobuf message parses it

# (plane, method, request or stream, message type named in the refusal)
UNPARSABLE: list[tuple[str, str, str, str]] = [
    ("data", "/inference.GRPCInferenceService/ModelInfer", "unary", "inference.ModelInferRequest"),
    (
        "data",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "stream",
        "inference.ModelInferRequest",
    ),
    (
        "data",
        "/inference.GRPCInferenceService/ModelMetadata",
        "unary",
        "inference.ModelMetadataRequest",
    ),
    ("sync", "/weightsync.v1.WeightSync/GetModel", "unary", "weightsync.v1.GetModelRequest"),
    ("sync", "/weightsync.v1.WeightSync/Rollback", "unary", "weightsync.v1.RollbackRequest"),
]


@pytest.mark.parametrize(
    ("plane", "method", "shape", "message"),
    UNPARSABLE,
    ids=[u[1].rsplit("/", 1)[1] for u in UNPARSABLE],
)
def test_a_request_that_is_not_protobuf_is_an_invalid_argument(
    bench: Bench, plane: str, method: str, shape: str, message: str
) -> None:
    """Not grpcio's UNKNOWN or INTERNAL: garbage is bad input like any other, on both planes
    (the sync plane's calls pass through the relay to the service)."""
    address = bench.inference.data if plane == "data" else bench.inference.sync
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        if shape == "unary":
            channel.unary_unary(method)(GARBAGE, timeout=10)
        else:
            list(channel.stream_stream(method)(iter([GARBAGE]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert f"not a valid {message}" in (caught.value.details() or "")
    assert "Traceback" not in bench.inference.log.read_text()
    assert_untouched(bench)
