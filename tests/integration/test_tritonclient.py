"""tritonclient's gRPC client, unchanged, against the data plane: every RPC it calls."""

from __future__ import annotations

import queue
from collections.abc import Callable
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


def test_requests_in_flight_on_one_stream_run_batched_and_answer_in_order(
    inference: Inference,
) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    inputs = [np.full((1, 4), float(i), np.float32) for i in range(200)]
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, x in enumerate(inputs):  # sent without waiting for answers
            tensor = triton.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer("mlp", [tensor], request_id=str(i))
        got = [answers.get(timeout=30) for _ in range(len(inputs))]
    finally:
        client.stop_stream()
    assert [error for _, error in got] == [None] * len(inputs)
    assert [r.get_response().id for r, _ in got] == [str(i) for i in range(len(inputs))]  # type: ignore[attr-defined]
    (stats,) = client.get_inference_statistics("mlp").model_stats
    assert stats.inference_count == len(inputs)
    assert stats.execution_count < len(inputs)  # they ran together, not one after another
    # Each answer is its own request's. Batched and alone the matmul sums in another order
    # (outputs near 100 differ in their last float32 bits); the inputs differ by whole units.
    for i in (0, 77, 199):
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(inputs[i])
        alone = client.infer("mlp", [tensor], client_timeout=10).as_numpy("y")
        assert np.allclose(got[i][0].as_numpy("y"), alone, rtol=1e-5, atol=1e-4)  # type: ignore[attr-defined]


def test_a_stream_cancelled_with_requests_in_flight_leaves_the_service_serving(
    inference: Inference,
) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    answers: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(result))
    for i in range(200):
        client.async_stream_infer("mlp", [x_input(1)], request_id=str(i))
    answers.get(timeout=30)
    client.stop_stream(cancel_requests=True)  # the rest are abandoned mid-flight
    again = triton.InferenceServerClient(url=inference.data)
    assert again.infer("mlp", [x_input(2)], client_timeout=10).as_numpy("y").shape == (2, 2)
    assert again.is_server_ready()


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


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_repository_calls_answer_for_the_served_models(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("frozen", "0", "READY"),
        ("mlp", "0", "READY"),
    ]
    assert len(client.get_model_repository_index().models) == 2
    client.load_model("mlp")  # it is loaded: nothing to do
    assert status_of(lambda: client.load_model("nope")) == (
        "StatusCode.NOT_FOUND",
        "no model named 'nope' is served here (served: frozen, mlp)",
    )
    code, message = status_of(lambda: client.load_model("mlp", config='{"max_batch_size": 2}'))
    assert code == "StatusCode.UNIMPLEMENTED" and "takes no config or files" in message
    code, message = status_of(lambda: client.unload_model("mlp"))
    assert code == "StatusCode.UNIMPLEMENTED" and "cannot be unloaded" in message
    assert client.is_model_ready("mlp")


def test_shared_memory_trace_and_log_calls_get_real_answers(inference: Inference) -> None:
    client = triton.InferenceServerClient(url=inference.data)
    assert len(client.get_system_shared_memory_status().regions) == 0
    assert len(client.get_cuda_shared_memory_status().regions) == 0
    client.unregister_system_shared_memory()  # all of none
    client.unregister_cuda_shared_memory()
    for call in (
        lambda: client.get_system_shared_memory_status("r"),
        lambda: client.unregister_cuda_shared_memory("r"),
    ):
        assert status_of(call) == (
            "StatusCode.NOT_FOUND",
            "no shared-memory region named 'r' is registered",
        )
    for call in (
        lambda: client.register_system_shared_memory("r", "/r", 64),
        lambda: client.register_cuda_shared_memory("r", b"\0" * 64, 0, 64),
    ):
        code, message = status_of(call)
        assert code == "StatusCode.UNIMPLEMENTED" and "send tensor contents" in message
    code, message = status_of(client.get_trace_settings)
    assert code == "StatusCode.UNIMPLEMENTED" and "tracing is not supported" in message
    code, message = status_of(client.get_log_settings)
    assert code == "StatusCode.UNIMPLEMENTED" and "--log-level" in message
