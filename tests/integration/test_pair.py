"""The pair end to end: real processes, real channels, an off-the-shelf OIP client."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.weights.digest import state_digest
from tests.devices import devices
from tests.integration.apps import MLP, Stamp
from tests.integration.conftest import Inference, Services, wait_until

PAIR = "tests.integration.apps:pair"
STAMP = "tests.integration.apps:stamp"
X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
DEVICES = devices()  # the inference service on CUDA too where there is a GPU


@pytest.fixture
def pretrained(services: Services, tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = {k: v.clone() for k, v in MLP().state_dict().items()}
    path = tmp_path / "frozen.safetensors"
    safetensors.torch.save_file(state, path)
    services.env["TEST_PRETRAINED"] = str(path)
    return state


def triton_infer(inference: Inference, model: str, x: np.ndarray) -> tuple[str, np.ndarray]:
    client = triton.InferenceServerClient(url=inference.data)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], client_timeout=10)
    return result.get_response().model_version, result.as_numpy(_output_names(model)[0])


def _output_names(model: str) -> list[str]:
    return ["means"] if model == "stamp" else ["y"]


def local_outputs(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    model = MLP()
    model.load_state_dict(state)
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_runs_raise_the_version_and_outputs_match_the_trainer_bit_exactly(
    services: Services, pretrained: dict[str, torch.Tensor], tmp_path: Path, device: str
) -> None:
    inference = services.inference(PAIR, "--device", device)
    assert triton_infer(inference, "mlp", X)[0] == "0"
    trainer = services.trainer(
        PAIR,
        [inference],
        *("--max-runs", "3", "--state-dir", str(tmp_path / "trainer"), "--device", device),
    )
    assert trainer.wait(timeout=120) == 0, services.log("trainer")

    version, served = triton_infer(inference, "mlp", X)
    assert version == "4"  # the catch-up sync at start, then one per run
    trained = safetensors.torch.load_file(
        tmp_path / "trainer" / "checkpoint" / "models" / "mlp.safetensors"
    )
    if device == "cpu":
        np.testing.assert_array_equal(served, local_outputs(trained, X))
    else:  # the weights are bit-exact (the digest below); a GPU's matmul rounds differently
        np.testing.assert_allclose(served, local_outputs(trained, X), rtol=1e-4, atol=1e-5)
    state = inference.model_state("mlp")
    assert (state.version, state.writer_id) == (4, "trainer")
    assert state.digest == state_digest(trained)


def test_the_plain_oip_surface_answers_like_triton(
    services: Services, pretrained: dict[str, torch.Tensor]
) -> None:
    inference = services.inference(PAIR)
    client = triton.InferenceServerClient(url=inference.data)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("frozen")
    meta = client.get_model_metadata("mlp")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 2])]
    assert list(meta.versions) == ["0"]
    assert client.get_server_metadata().name == "weightsync"


def test_inference_only_model_serves_its_pretrained_file_and_refuses_pushes(
    services: Services, pretrained: dict[str, torch.Tensor]
) -> None:
    inference = services.inference(PAIR)
    version, served = triton_infer(inference, "frozen", X)
    assert version == "0"
    np.testing.assert_array_equal(served, local_outputs(pretrained, X))
    header = sync_pb.PushHeader(model_name="frozen", version=1, writer_id="t", payload_bytes=8)
    with pytest.raises(grpc.RpcError) as caught:
        inference.sync_stub().Push(iter([sync_pb.PushRequest(header=header)]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "inference-only" in (caught.value.details() or "")
    assert not inference.model_state("frozen").accepts_pushes


@pytest.mark.parametrize("model", ["nope", "scratch"])
def test_unknown_and_training_only_models_are_not_found(
    services: Services, pretrained: dict[str, torch.Tensor], model: str
) -> None:
    inference = services.inference(PAIR)
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(inference, model, X)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert f"no model named '{model}'" in caught.value.message()


def test_malformed_tensor_is_invalid_argument(
    services: Services, pretrained: dict[str, torch.Tensor]
) -> None:
    inference = services.inference(PAIR)
    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(inference.data))
    request = oip.ModelInferRequest(model_name="mlp", raw_input_contents=[b"\0" * 12])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x" in (caught.value.details() or "")


def stamp_check(inference: Inference) -> tuple[int, float]:
    """Query the stamp model; assert the response is one whole version; return it and its value."""
    version, means = triton_infer(inference, "stamp", np.zeros((1, 8), np.float32))
    assert np.all(means == means[0, 0]), f"version {version}: a response mixed versions: {means}"
    return int(version), float(means[0, 0])


def filled_stamp(megabytes: int, value: float) -> dict[str, torch.Tensor]:
    model = Stamp(megabytes)
    with torch.no_grad():
        for p in model.parts:
            p.fill_(value)
    return model.state_dict()


@pytest.mark.parametrize("device", DEVICES)
def test_killing_trainers_mid_push_repeatedly_keeps_the_old_version_serving_bit_exact(
    services: Services, device: str
) -> None:
    services.env["TEST_STAMP_MB"] = "96"
    inference = services.inference(STAMP, "--device", device)
    cuts = 0
    for attempt in range(12):
        trainer = services.trainer(STAMP, [inference], name=f"trainer{attempt}")
        interrupted = 0
        deadline = time.monotonic() + 60
        while not interrupted and time.monotonic() < deadline:
            state = inference.model_state("stamp")
            if state.HasField("pending") and state.pending.bytes_received > 0:
                trainer.send_signal(signal.SIGKILL)
                interrupted = state.pending.version
            time.sleep(0.002)
        trainer.wait(timeout=10)
        assert interrupted, services.log(f"trainer{attempt}")
        wait_until(lambda: not inference.model_state("stamp").HasField("pending"))
        state = inference.model_state("stamp")
        if state.version >= interrupted:
            continue  # the push finished before the kill landed: not the case under test
        cuts += 1
        version, value = stamp_check(inference)
        assert version == state.version
        assert state.digest == state_digest(filled_stamp(96, value))  # every byte as committed
        if cuts == 3:
            break
    assert cuts == 3, "could not kill a trainer during a push three times in 12 attempts"
    log = inference.log.read_text()  # the cut streams were noticed and refused
    assert log.count("cancelled the push") + log.count("without a commit") >= 3


@pytest.mark.parametrize("device", DEVICES)
def test_no_response_ever_mixes_two_versions_while_syncs_stream_in(
    services: Services, device: str
) -> None:
    services.env["TEST_STAMP_MB"] = "16"
    inference = services.inference(STAMP, "--device", device)
    services.trainer(STAMP, [inference])
    seen: dict[int, float] = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                version, value = stamp_check(inference)
                assert seen.setdefault(version, value) == value, "one version, two values"
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(seen) >= 6 or bool(failures), timeout=90)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    assert len(seen) >= 6
    versions = sorted(seen)
    assert [seen[v] for v in versions] == sorted(seen[v] for v in versions)  # only forward


def test_a_second_trainer_takes_the_model_over_and_the_first_is_fenced(
    services: Services,
) -> None:
    inference = services.inference(STAMP)
    first = services.trainer(STAMP, [inference], "--run-interval", "0.1", name="first")
    wait_until(lambda: inference.model_state("stamp").version >= 3)
    second = services.trainer(STAMP, [inference], "--run-interval", "0.1", name="second")
    assert first.wait(timeout=60) == 3, services.log("first")
    assert "another trainer has taken it over" in services.log("first")
    assert "written by 'second'" in services.log("first")
    taken = inference.model_state("stamp")
    wait_until(lambda: inference.model_state("stamp").version >= taken.version + 3)
    state = inference.model_state("stamp")
    assert (state.writer_id, state.lease_holder, state.writer_epoch) == ("second", "second", 2)
    assert second.poll() is None
