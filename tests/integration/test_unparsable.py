"""Garbage on the wire. Requests that are not protobuf at all, on both planes: INVALID_ARGUMENT
naming the message they should have been (grpcio alone answers UNKNOWN or INTERNAL). Seeded byte
mutations of a good inference request: each answered OK or with a clear client-side status, never
UNKNOWN or INTERNAL. The served weights stay as they were."""

from __future__ import annotations

import random
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from shared.gen.inference import grpc_service_pb2 as oip
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


def test_mutated_inference_requests_get_clear_answers(bench: Bench) -> None:
    request = oip.ModelInferRequest(model_name="stamp", id="fuzz")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 8])
    request.raw_input_contents.append(np.ones((2, 8), np.float32).tobytes())
    good = request.SerializeToString()
    rng = random.Random(20261126)
    seen: dict[str, int] = {}
    with grpc.insecure_channel(bench.inference.data) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(400):
            mutated = bytearray(good)
            if rng.random() < 0.6:
                for _ in range(rng.randint(1, 4)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            else:
                at = rng.randrange(len(mutated))
                mutated[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            try:
                infer(bytes(mutated), timeout=10)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
                assert code in ("INVALID_ARGUMENT", "NOT_FOUND"), (code, error.details())
                assert error.details()
            seen[code] = seen.get(code, 0) + 1
        assert infer(good, timeout=10)
    assert seen.get("INVALID_ARGUMENT", 0) > 200, seen
    assert "Traceback" not in bench.inference.log.read_text()
    assert_untouched(bench)
