"""tritonclient's gRPC client, unchanged, against the data plane: every RPC it calls."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.integration.apps import MLP
from tests.integration.conftest import Inference, Services


@pytest.fixture
def inference(services: Services, tmp_path: Path) -> Inference:
    safetensors.torch.save_file(MLP().state_dict(), tmp_path / "frozen.safetensors")
    services.env["TEST_PRETRAINED"] = str(tmp_path / "frozen.safetensors")
    return services.inference("tests.integration.apps:pair", "--max-batch-size", "16")


def x_input(rows: int = 3) -> triton.InferInput:
    tensor = triton.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 4), np.float32))
    return tensor


def test_infer_echoes_id_and_parameters(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    result = client.infer(
        "mlp", [x_input()], request_id="req-7", parameters={"tag": "a"}, client_timeout=10
    )
    response = result.get_response()
    assert (response.id, response.model_version) == ("req-7", "0")
    assert response.parameters["tag"].string_param == "a"
    assert result.as_numpy("y").shape == (3, 2)


def test_model_config_and_statistics(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    config = client.get_model_config("mlp").config
    assert (config.name, config.max_batch_size) == ("mlp", 16)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", 11, [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [2])]
    for _ in range(3):
        client.infer("mlp", [x_input(2)], client_timeout=10)
    with pytest.raises(InferenceServerException):
        client.infer("mlp", [triton.InferInput("x", [1, 3], "FP32")], client_timeout=10)
    (stats,) = client.get_inference_statistics("mlp").model_stats
    assert stats.name == "mlp" and stats.inference_count == 6 and stats.execution_count == 3
    assert stats.inference_stats.success.count == 3
    assert stats.inference_stats.compute_infer.count == 3
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {"mlp", "frozen"}
    metadata = client.get_server_metadata()
    assert "statistics" in metadata.extensions and "model_configuration" in metadata.extensions


def test_stream_infer_answers_in_order_and_reports_errors_in_band(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("mlp", [x_input(1)], request_id="1")
        client.async_stream_infer("nope", [x_input(1)], request_id="2")
        client.async_stream_infer("mlp", [x_input(2)], request_id="3")
        got = [answers.get(timeout=10) for _ in range(3)]
    finally:
        client.stop_stream()
    (first, e1), (_, e2), (third, e3) = got
    assert e1 is None and e3 is None
    assert first.get_response().id == "1" and third.as_numpy("y").shape == (2, 2)  # type: ignore[attr-defined]
    assert "no model named 'nope'" in str(e2)


def test_error_codes_reach_tritonclient(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_config("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    bad = triton.InferInput("x", [1, 4], "FP64")
    bad.set_data_from_numpy(np.ones((1, 4), np.float64))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mlp", [bad], client_timeout=10)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "datatype 'FP64' but the model takes FP32" in caught.value.message()
