"""BYTES tensors end to end: tritonclient (raw), typed contents, batching, the project client."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from inference_service.client import InferenceClient
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import Inference, Services

WORDS = np.array([b"grpc", b"", "h\u00e9llo".encode(), b"a\x00b"], dtype=object)


@pytest.fixture
def inference(services: Services) -> Inference:
    return services.inference("tests.integration.apps:text", "--max-batch-size", "64")


def triton_words(client: triton.InferenceServerClient, words: np.ndarray) -> triton.InferResult:
    tensor = triton.InferInput("text", list(words.shape), "BYTES")
    tensor.set_data_from_numpy(words)
    return client.infer("words", [tensor], client_timeout=10)


def test_tritonclient_sends_and_reads_bytes(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    result = triton_words(client, WORDS)
    assert list(result.as_numpy("upper")) == [w.upper() for w in WORDS]
    np.testing.assert_array_equal(result.as_numpy("length"), [4, 0, 6, 3])
    config = client.get_model_config("words").config
    assert [(i.name, i.data_type) for i in config.input] == [("text", oip.TYPE_STRING)]
    meta = client.get_model_metadata("words")
    assert [(t.name, t.datatype) for t in meta.outputs] == [("upper", "BYTES"), ("length", "FP32")]


def test_typed_bytes_contents_in_and_out(inference: Inference) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inference.data))
    request = oip.ModelInferRequest(model_name="words")
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [b"ab", b"xyz"]
    )
    response = stub.ModelInfer(request, timeout=10)
    assert not response.raw_output_contents
    upper, length = response.outputs
    assert (upper.datatype, list(upper.contents.bytes_contents)) == ("BYTES", [b"AB", b"XYZ"])
    assert list(length.contents.fp32_contents) == [2.0, 3.0]


def test_concurrent_requests_are_batched_and_each_gets_its_own_strings(
    inference: Inference,
) -> None:
    failures: list[BaseException] = []

    def ask(index: int) -> None:
        client = triton.InferenceServerClient(url=inference.data)
        words = np.array([f"w{index}-{i}".encode() for i in range(index % 3 + 1)], dtype=object)
        try:
            for _ in range(20):
                result = triton_words(client, words)
                assert list(result.as_numpy("upper")) == [w.upper() for w in words]
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    stats = triton.InferenceServerClient(url=inference.data).get_inference_statistics("words")
    (model,) = stats.model_stats
    assert model.execution_count < model.inference_count  # some requests shared a batch


def test_malformed_raw_bytes_are_invalid_argument(inference: Inference) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inference.data))
    for raw, message in [
        ((9).to_bytes(4, "little") + b"short", "says 9 bytes but only 5 follow"),
        ((1).to_bytes(4, "little") + b"a", "1 BYTES elements but the shape needs 2"),
        (b"\x01\x00", "is cut off"),
    ]:
        request = oip.ModelInferRequest(model_name="words", raw_input_contents=[raw])
        request.inputs.add(name="text", datatype="BYTES", shape=[2])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")


def test_the_project_client_takes_and_returns_bytes(inference: Inference) -> None:
    with InferenceClient(inference.data) as client:
        result = client.infer("words", {"text": np.array(["abc", b"de"], dtype=object)})
    upper = result.outputs["upper"]
    assert isinstance(upper, np.ndarray) and list(upper) == [b"ABC", b"DE"]
    assert result.outputs["length"].tolist() == [3.0, 2.0]
