"""The data plane parses requests in its handlers (no interceptor of its own), with and without
a data token: the token is checked before the request is read, a request that does not parse
gets INVALID_ARGUMENT once past it, and the in-flight gauges, read when scraped, come back to 0
once requests are answered."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import Inference, Services

STAMP = "tests.integration.apps:stamp"
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
GARBAGE = b"\xff\xff\xff\xff"  # field 31, wire type 7: no protobuf message parses it
TOKEN = (("authorization", "Bearer data-secret"),)


def refusal(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def gauges(inference: Inference) -> dict[str, float]:
    """The in-flight gauges' samples, by name and labels."""
    text = inference.metrics()
    found = re.findall(r"^(weightsync_inference_request\S*in_flight\S*) (\S+)$", text, re.M)
    return {name: float(value) for name, value in found}


def request(rows: np.ndarray) -> oip.ModelInferRequest:  # type: ignore[type-arg]
    message = oip.ModelInferRequest(model_name="stamp", id="r")
    message.inputs.add(name="x", datatype="FP32", shape=list(rows.shape))
    message.raw_input_contents.append(rows.astype("<f4").tobytes())
    return message


def test_a_data_token_is_checked_before_the_request_is_parsed(services: Services) -> None:
    services.env.update(INFERENCE_DATA_TOKEN="data-secret")
    inference = services.inference(STAMP)
    channel = grpc.insecure_channel(inference.data)

    unread = refusal(lambda: channel.unary_unary(INFER)(GARBAGE, timeout=10))
    assert unread.code() == grpc.StatusCode.UNAUTHENTICATED, unread.details()
    assert "missing bearer token for the data plane" in (unread.details() or "")

    for call in (
        lambda: channel.unary_unary(INFER)(GARBAGE, timeout=10, metadata=TOKEN),
        lambda: list(channel.stream_stream(STREAM)(iter([GARBAGE]), timeout=10, metadata=TOKEN)),
    ):
        error = refusal(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "not a valid inference.ModelInferRequest (it does not parse)" in (
            error.details() or ""
        )

    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    rows = np.arange(16, dtype=np.float32).reshape(2, 8)
    answer = stub.ModelInfer(request(rows), timeout=10, metadata=TOKEN)
    assert (answer.model_name, answer.id, [o.name for o in answer.outputs]) == (
        "stamp",
        "r",
        ["means"],
    )
    assert list(answer.outputs[0].shape) == [2, 8]
    streamed = list(stub.ModelStreamInfer(iter([request(rows)] * 3), timeout=10, metadata=TOKEN))
    assert [s.error_message for s in streamed] == ["", "", ""]
    assert [s.infer_response.raw_output_contents for s in streamed] == [
        answer.raw_output_contents
    ] * 3

    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )  # parsed by its handler too, and open without a token
    assert "Traceback" not in inference.log.read_text()

    # answered, so nothing is in flight; the model's gauge exists once it was asked
    assert gauges(inference) == {
        'weightsync_inference_requests_in_flight{model="stamp"}': 0.0,
        "weightsync_inference_request_bytes_in_flight": 0.0,
    }
