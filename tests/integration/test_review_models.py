"""Outside review: the models users write, trainer to inference service to OIP answer.

Each test trains a model of tests/integration/user_models.py for a few runs with real
processes, then checks the served copy bit for bit: GetModel's digest against the trainer's
checkpoint (served as its `served_dtype` says) and the OIP answer against that checkpoint run
locally.
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
import tritonclient.grpc as triton
from torch import nn

from devtools.launch import NotReadyError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from shared.weights.served import serve_module, served_state
from shared.weights.writer import Payload
from tests.integration.conftest import Inference, Services, wait_until
from tests.integration.user_models import TiedLM, Transposed

APPS = "tests.integration.user_models"
X = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)


def infer(inference: Inference, model: str) -> tuple[str, np.ndarray]:
    client = triton.InferenceServerClient(url=inference.data)
    tensor = triton.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer(model, [tensor], client_timeout=10)
    return result.get_response().model_version, result.as_numpy("y")


def train(services: Services, app: str, inference: Inference, tmp_path: Path, runs: int) -> None:
    trainer = services.trainer(
        f"{APPS}:{app}",
        [inference],
        *("--max-runs", str(runs), "--state-dir", str(tmp_path / "trainer")),
    )
    assert trainer.wait(timeout=120) == 0, services.log("trainer")


def checkpoint(tmp_path: Path, model: str) -> dict[str, torch.Tensor]:
    path = tmp_path / "trainer" / "checkpoint" / "models" / f"{model}.safetensors"
    return safetensors.torch.load_file(path)


def local(
    module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> np.ndarray:
    module.load_state_dict(state)
    serve_module(module, dtype)
    with torch.inference_mode():
        out: np.ndarray = module.eval()(torch.from_numpy(X)).numpy()
    return out


# A model whose forward writes a buffer while it serves (here a count of the rows served)
# drifted from the trainer's weights: a push that did not carry the buffer (the trainer left it
# alone) kept what the standby copy's forward had written into it while it was live, and
# GetModel gave the trainer's digest all the same (found by an outside review). As PAMIQ's sync
# does, each version now starts from the trainer's state exactly.
def test_a_buffer_the_served_forward_writes_starts_each_version_as_trained(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(f"{APPS}:counting")
    for _ in range(4):  # the live copy counts 20 rows
        infer(inference, "counting")
    train(services, "counting", inference, tmp_path, 3)
    trained = checkpoint(tmp_path, "counting")
    assert trained["seen"].item() == 0
    assert inference.model_state("counting").digest == state_digest(trained)
    version, served = infer(inference, "counting")  # its first 5 rows
    assert version == "4"
    expected = (torch.tensor([float(len(X))]) + trained["w"]).expand(len(X), 16).numpy()
    np.testing.assert_array_equal(served, expected)


# A trainer whose app has a model the inference service does not serve (a newer app with one
# more model) trained no run at all: that model's first sync was retried every 10 s for good,
# logged as a warning, where a refusal is documented to leave training going (found by an
# outside review). A service answering that it serves no such model now refuses it.
def test_a_model_the_service_does_not_serve_is_refused_and_training_goes_on(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(f"{APPS}:counting")
    train(services, "counting_and_transposed", inference, tmp_path, 2)
    log = services.log("trainer")
    assert "model transposed: its first push was refused; training goes on" in log, log
    assert "no model named 'transposed' is served here (served: counting)" in log, log
    assert inference.model_state("counting").version >= 2  # 1: the first sync, then runs


def test_tied_shared_and_odd_tensors_are_served_bit_exactly(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(f"{APPS}:tied")
    train(services, "tied", inference, tmp_path, 3)
    version, served = infer(inference, "tied")
    trained = checkpoint(tmp_path, "tied")
    assert version == "4"
    assert inference.model_state("tied").digest == state_digest(trained)
    np.testing.assert_array_equal(served, local(TiedLM(), trained, None))


def test_tied_fp64_model_served_in_bf16_is_the_trained_one_converted(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(f"{APPS}:tied_bf16")
    train(services, "tied_bf16", inference, tmp_path, 3)
    version, served = infer(inference, "tied")
    trained = checkpoint(tmp_path, "tied")
    assert trained["emb.weight"].dtype == torch.float64
    assert version == "4"
    state = inference.model_state("tied")
    assert state.digest == state_digest(served_state(trained, torch.bfloat16))
    expected = local(TiedLM().to(torch.float64), trained, torch.bfloat16)
    np.testing.assert_array_equal(served, expected)


def test_a_transposed_parameter_is_served_bit_exactly(services: Services, tmp_path: Path) -> None:
    inference = services.inference(f"{APPS}:transposed")
    train(services, "transposed", inference, tmp_path, 2)
    version, served = infer(inference, "transposed")
    trained = checkpoint(tmp_path, "transposed")
    assert version == "3"
    assert inference.model_state("transposed").digest == state_digest(trained)
    np.testing.assert_array_equal(served, local(Transposed(), trained, None))


def refused_at_start(services: Services, app: str, *extra: str, name: str) -> str:
    """Start an inference service that must refuse to start; the end of its log."""
    with pytest.raises(NotReadyError, match="exited with code 2 before it was ready") as caught:
        services.inference(f"{APPS}:{app}", *extra, name=name)
    assert "Traceback" not in services.log(name)
    return str(caught.value)


def test_a_factory_that_raises_or_a_bad_pretrained_file_is_refused_naming_the_model(
    services: Services, tmp_path: Path
) -> None:
    log = refused_at_start(services, "factory_raises", name="raises")
    assert "model 'broken': its factory raised RuntimeError: the tokenizer files are missing" in log
    trainer = services.trainer(f"{APPS}:factory_raises", [], "--inference", "127.0.0.1:1")
    assert trainer.wait(timeout=60) == 2
    assert "model 'broken': its factory raised RuntimeError" in services.log("trainer")
    assert "Traceback" not in services.log("trainer")

    services.env["TEST_PRETRAINED"] = str(tmp_path / "missing.safetensors")
    log = refused_at_start(services, "frozen", name="missing")
    assert "model 'frozen': its factory raised FileNotFoundError" in log
    assert "missing.safetensors" in log
    wrong = tmp_path / "wrong.safetensors"  # the weights of another model
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in Transposed().state_dict().items()}, wrong
    )
    services.env["TEST_PRETRAINED"] = str(wrong)
    log = refused_at_start(services, "frozen", name="wrong")
    assert "model 'frozen': its factory raised RuntimeError" in log
    assert 'Unexpected key(s) in state_dict: "again", "b", "w"' in log


def test_a_tensor_of_a_dtype_that_cannot_travel_is_refused_at_start_naming_it(
    services: Services,
) -> None:
    log = refused_at_start(services, "complex128", name="c128")
    assert "model 'c128': tensor 'c' is torch.complex128, which cannot travel" in log
    trainer = services.trainer(f"{APPS}:complex128", [], "--inference", "127.0.0.1:1")
    assert trainer.wait(timeout=60) == 2
    assert "model 'c128': tensor 'c' is torch.complex128" in services.log("trainer")


def test_a_stored_version_of_another_layout_is_refused_at_restart_naming_the_tensor(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "inference-state"
    inference = services.inference(f"{APPS}:tied", "--state-dir", str(state), name="first")
    train(services, "tied", inference, tmp_path, 1)
    wait_until(lambda: any((state / "models" / "tied").glob("*2.safetensors")), 30)
    inference.process.send_signal(signal.SIGTERM)
    assert inference.process.wait(timeout=30) == 0

    # The app now trains the model in fp64 and serves it in bf16.
    log = refused_at_start(services, "tied_bf16", "--state-dir", str(state), name="second")
    assert "model 'tied': no weights file in" in log
    assert "tensor 'again.bias' is F32[8] in the file but BF16[8] in the model" in log


def test_the_trainer_refuses_a_checkpoint_saved_in_another_dtype_naming_the_tensor(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(f"{APPS}:tied", name="first")
    train(services, "tied", inference, tmp_path, 1)

    # The app now trains the model in fp64: the fp32 checkpoint is not loaded into it.
    fresh = services.inference(f"{APPS}:tied_bf16", name="fresh")
    trainer = services.trainer(
        f"{APPS}:tied_bf16",
        [fresh],
        *("--state-dir", str(tmp_path / "trainer"), "--max-runs", "1"),
        name="again",
    )
    assert trainer.wait(timeout=60) == 2
    log = services.log("again")
    assert "cannot resume from the checkpoint" in log
    assert "models/tied.safetensors: tensor 'scale' was saved as torch.float32 but the " in log
    assert "module has it as torch.float64" in log
    assert fresh.model_state("tied").version == 0  # nothing was pushed


def push(inference: Inference, model: str, state: dict[str, torch.Tensor]) -> None:
    """Push `state` whole as version 1 under a fresh writer lease."""
    lease = inference.sync_stub().AcquireWriter(
        pb.AcquireWriterRequest(model_name=model, writer_id="user"), timeout=10
    )
    payload = Payload.of(list(state.items()))
    header = pb.PushHeader(
        model_name=model,
        version=1,
        writer_id="user",
        payload_bytes=payload.nbytes,
        writer_epoch=lease.epoch,
    )
    messages = [pb.PushRequest(header=header)]
    messages += [pb.PushRequest(data=chunk) for chunk in payload.chunks()]
    messages.append(pb.PushRequest(commit=pb.PushCommit(digest=state_digest(state))))
    inference.sync_stub().Push(iter(messages), timeout=30)


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_push_giving_tied_tensors_different_values_is_refused_and_nothing_changes(
    services: Services, relay: str
) -> None:
    inference = services.inference(f"{APPS}:tied", "--sync-relay", relay)
    before = inference.model_state("tied")
    _, answer = infer(inference, "tied")
    state = {k: v.detach().clone().contiguous() for k, v in TiedLM().state_dict().items()}
    state["head.weight"] = state["head.weight"] + 1  # the sender's model is not tied
    with pytest.raises(grpc.RpcError) as caught:
        push(inference, "tied", state)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "model 'tied': tensors 'emb.weight', 'head.weight' are one tensor in this model (tied: "
        "they share memory), but the push gives them different values" in caught.value.details()
    )
    wait_until(lambda: not inference.model_state("tied").HasField("pending"), timeout=10)
    after = inference.model_state("tied")
    assert (after.version, after.digest) == (0, before.digest)
    version, served = infer(inference, "tied")
    assert version == "0"
    np.testing.assert_array_equal(served, answer)

    state["head.weight"] = state["emb.weight"].clone()
    state["again.bias"] = state["proj.bias"] + 1  # a layer registered twice, not the same
    with pytest.raises(grpc.RpcError) as caught:
        push(inference, "tied", state)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensors 'again.bias', 'alias', 'proj.bias' are one tensor" in caught.value.details()

    state["again.bias"] = state["alias"] = state["proj.bias"]  # a consistent push commits
    push(inference, "tied", state)
    assert inference.model_state("tied").digest == state_digest(state)
    np.testing.assert_array_equal(infer(inference, "tied")[1], local(TiedLM(), state, None))
