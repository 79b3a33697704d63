"""Outside review: a model zoo (tests/integration/zoo_apps.py) served and trained as an ML
engineer would: dozens of models trained by several trainers, a model of thousands of tensors
with long, dotted and unicode names, BatchNorm, tied and 0-d and zero-element tensors, an
inference-only model. Each test checks what a user sees over gRPC."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
import tritonclient.grpc as triton

from devtools.launch import inference_command, trainer_command
from shared.gen.inference import grpc_service_pb2 as oip
from shared.gen.inference import grpc_service_pb2_grpc as oip_grpc
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc
from shared.weights.digest import state_digest
from shared.weights.served import serve_module
from shared.weights.writer import Payload
from tests.integration import zoo_apps
from tests.integration.conftest import ROOT, Inference, Services, wait_until
from tests.integration.test_review_models import X, checkpoint, local

APPS = "tests.integration.zoo_apps"
SMALL = [zoo_apps.small_name(i) for i in range(zoo_apps.SMALL)]
SERVED = [*SMALL, zoo_apps.UNICODE_MODEL]


def infer(inference: Inference, model: str) -> tuple[str, np.ndarray]:
    client = triton.InferenceServerClient(url=inference.data)
    tensor = triton.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer(model, [tensor], client_timeout=10)
    return result.get_response().model_version, result.as_numpy("y")


def train(
    services: Services,
    app: str,
    inference: list[Inference],
    tmp_path: Path,
    runs: int,
    *extra: str,
    name: str = "trainer",
    timeout: float = 120,
) -> int:
    trainer = services.trainer(
        f"{APPS}:{app}",
        inference,
        *("--max-runs", str(runs), "--state-dir", str(tmp_path / "trainer")),
        *extra,
        name=name,
    )
    return trainer.wait(timeout=timeout)


def states(inference: Inference) -> dict[str, tuple[int, bytes]]:
    return {m: (s.version, s.digest) for m, s in ((m, inference.model_state(m)) for m in SERVED)}


def test_a_zoo_of_dozens_of_models_is_listed_described_served_and_synced_bit_exactly(
    services: Services, tmp_path: Path
) -> None:
    pretrained = tmp_path / "frozen.safetensors"
    weights = {
        k: v.detach() + 0.5 if v.is_floating_point() else v
        for k, v in zoo_apps.Small(99).state_dict().items()
    }
    weights["head.weight"] = weights["emb.weight"].clone()  # tied: saved under both names
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, pretrained)
    services.env["ZOO_PRETRAINED"] = str(pretrained)
    inference = services.inference(f"{APPS}:small_zoo")
    frozen = infer(inference, "frozen")
    channel = grpc.insecure_channel(inference.data)
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    index = (
        stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10)
        if hasattr(oip, "RepositoryIndexRequest")
        else None
    )
    if index is not None:
        assert sorted(m.name for m in index.models) == sorted([*SERVED, "frozen"])
    for model in SERVED:
        meta = stub.ModelMetadata(oip.ModelMetadataRequest(name=model), timeout=10)
        assert meta.name == model
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 8])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("y", "FP32", [-1, 8])
        ]
        assert infer(inference, model)[0] == "0"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelMetadata(oip.ModelMetadataRequest(name="scratch"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # --max-runs counts runs of all trainers: 5 trainers, each runs once.
    assert train(services, "small_zoo", [inference], tmp_path, 5) == 0, services.log("trainer")
    for i, model in enumerate(SERVED):
        trained = checkpoint(tmp_path, model)
        state = inference.model_state(model)
        assert state.version == 2, model
        assert state.digest == state_digest(trained), model
        seed = i if model != zoo_apps.UNICODE_MODEL else 50
        version, served = infer(inference, model)
        assert version == "2"
        np.testing.assert_array_equal(served, local(zoo_apps.Small(seed), trained, None))
    # The inference-only model is served from its file, untouched by the trainer.
    assert inference.model_state("frozen").version == 0
    assert infer(inference, "frozen")[0] == "0"
    np.testing.assert_array_equal(infer(inference, "frozen")[1], frozen[1])
    expected = zoo_apps.Small(99)
    expected.load_state_dict(weights)
    serve_module(expected, None)
    with torch.inference_mode():
        np.testing.assert_array_equal(frozen[1], expected.eval()(torch.from_numpy(X)).numpy())


def test_a_push_refused_for_one_model_leaves_it_served_as_it_was_and_the_zoo_trains_on(
    services: Services, tmp_path: Path
) -> None:
    """The inference service runs another version of the app, where m05 has one more tensor,
    so every push of m05 is refused (INVALID_ARGUMENT: a full push must carry every tensor).
    docs/sync.md: "A failed sync never cuts a run short ... the services it missed are caught
    up later": the 32 other models, trained by the same and other trainers, must go on being
    trained and synced. Instead the trainer retries m05's initial sync forever (backoff capped
    at 10 s, a new version number each time) and never runs a single trainer."""
    services.env["ZOO_SHIFT_ON_INFERENCE"] = "m05"
    inference = services.inference(f"{APPS}:small_zoo")
    del services.env["ZOO_SHIFT_ON_INFERENCE"]
    before = states(inference)
    answer = infer(inference, "m05")

    trainer = services.trainer(
        f"{APPS}:small_zoo",
        [inference],
        *("--max-runs", "10", "--state-dir", str(tmp_path / "trainer")),
    )
    others = [m for m in SERVED if m != "m05"]
    try:
        # Unrefused models are trained past their initial push (version 1) within seconds.
        wait_until(lambda: all(inference.model_state(m).version >= 2 for m in others), 20, 0.5)
        trained = True
    except AssertionError:
        trained = False
    after = states(inference)
    assert after["m05"] == before["m05"]  # the refused model is served as it was
    version, served = infer(inference, "m05")
    assert version == answer[0]
    np.testing.assert_array_equal(served, answer[1])
    log = services.log("trainer")
    assert "missing: extra" in log  # the refusal names the tensor
    assert trained, (
        f"trainer alive={trainer.poll() is None}; versions: "
        f"{ {m: after[m][0] for m in SERVED} }; log tail:\n{log[-1500:]}"
    )


def test_thousands_of_tensors_with_long_unicode_names_are_trained_and_served_bit_exactly(
    services: Services, tmp_path: Path
) -> None:
    inference = services.inference(f"{APPS}:shapes")
    assert train(services, "shapes", [inference], tmp_path, 4) == 0, services.log("trainer")
    for model, module in (("deep", zoo_apps.Deep()), ("wide", zoo_apps.Wide())):
        trained = checkpoint(tmp_path, model)
        state = inference.model_state(model)
        assert len(state.tensors) == len(trained)
        assert state.version == 3 and state.digest == state_digest(trained), model
        version, served = infer(inference, model)
        assert version == "3"
        np.testing.assert_array_equal(served, local(module, trained, None))


def test_the_admin_tool_lists_a_zoo_whose_models_hold_thousands_of_long_tensor_names(
    services: Services,
) -> None:
    """`weightsync-admin models` ("the models served, their versions and writers") prints a
    line per model. ListModels answers every model's whole tensor table, unbounded, so a zoo
    whose tables add up past the sync plane's 16 MiB message (here 3 models of 3,000 tensors
    named with 2,000 characters: 18 MB; as well 100 models of 1,000 tensors with 160-character
    names) cannot be listed at all: RESOURCE_EXHAUSTED "SERVER: Sent message larger than max",
    a gRPC internal message that names neither the model nor a setting."""
    services.env.update(ZOO_LONG_MODELS="3", ZOO_LONG_TENSORS="3000", ZOO_LONG_NAME="2000")
    inference = services.inference(f"{APPS}:long_names")
    channel = grpc.insecure_channel(
        inference.sync, options=[("grpc.max_receive_message_length", 16 << 20)]
    )
    for model in ("long0", "long1", "long2"):  # each model alone is described in 6 MB
        request = pb.GetModelRequest(model_name=model)
        assert len(sync_grpc.WeightSyncStub(channel).GetModel(request, timeout=10).tensors) == 3000
    admin = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "weightsync-admin"), "--sync", inference.sync, "models"],
        capture_output=True,
        text=True,
        timeout=60,
        env=services.env,
    )
    assert admin.returncode == 0, admin.stderr
    assert [line.split("\t")[0] for line in admin.stdout.splitlines()] == [
        "long0",
        "long1",
        "long2",
    ]


def test_a_model_whose_header_passes_a_raised_max_header_bytes_is_pushed_by_its_trainer(
    services: Services,
) -> None:
    """One model of 8,000 tensors named with 2,200 characters: an 18 MB safetensors header,
    so the inference service is started with `--max-header-bytes 64MiB` (docs/configuration:
    "largest safetensors header accepted in a push"). The trainer never pushes it: its probe,
    GetModel, answers the model's whole tensor table in one sync-plane message (16 MiB at
    most), which fails RESOURCE_EXHAUSTED "SERVER: Sent message larger than max"; the trainer
    retries its initial sync forever ("cannot read the served version")."""
    services.env.update(ZOO_LONG_MODELS="1", ZOO_LONG_TENSORS="8000", ZOO_LONG_NAME="2200")
    inference = services.inference(f"{APPS}:long_names", "--max-header-bytes", "64MiB")
    trainer = services.trainer(f"{APPS}:long_names", [inference], "--max-runs", "1")

    def version() -> int:  # the served version, as the data plane answers it
        return int(infer(inference, "long0")[0])

    with contextlib.suppress(AssertionError):
        wait_until(lambda: version() >= 1 or trainer.poll() is not None, 18, 0.5)
    assert version() >= 1, services.log("trainer")[-1200:]


def test_a_corrupt_push_to_one_model_changes_nothing_and_the_zoo_trains_on_after_it(
    services: Services, tmp_path: Path
) -> None:
    """After a first training session, a push to m05 under the trainer's own lease whose
    commit carries a wrong digest is refused (INVALID_ARGUMENT) and changes nothing anywhere;
    a second session then trains every model on, m05 included."""
    services.env["ZOO_MODELS"] = "8"  # 8 small models and the unicode-named one
    served = [*SERVED[:8], zoo_apps.UNICODE_MODEL]
    inference = services.inference(f"{APPS}:small_zoo")
    assert train(services, "small_zoo", [inference], tmp_path, 5) == 0, services.log("trainer")
    before = {m: inference.model_state(m) for m in served}
    answers = {m: infer(inference, m) for m in served}
    assert all(s.version == 2 for s in before.values())

    state = checkpoint(tmp_path, "m05")
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    payload = Payload.of(list(moved.items()))
    header = pb.PushHeader(
        model_name="m05",
        version=3,
        writer_id="trainer",
        payload_bytes=payload.nbytes,
        writer_epoch=before["m05"].writer_epoch,
    )
    messages = [pb.PushRequest(header=header)]
    messages += [pb.PushRequest(data=chunk) for chunk in payload.chunks()]
    messages.append(pb.PushRequest(commit=pb.PushCommit(digest=state_digest(state))))
    with pytest.raises(grpc.RpcError) as caught:
        inference.sync_stub().Push(iter(messages), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    wait_until(lambda: not inference.model_state("m05").HasField("pending"), timeout=10)
    for model in served:
        after = inference.model_state(model)
        assert (after.version, after.digest) == (before[model].version, before[model].digest)
        version, answer = infer(inference, model)
        assert version == answers[model][0]
        np.testing.assert_array_equal(answer, answers[model][1])

    code = train(services, "small_zoo", [inference], tmp_path, 5, name="again")
    assert code == 0, services.log("again")
    for model in served:
        after = inference.model_state(model)
        assert after.version > 2, model
        assert after.digest == state_digest(checkpoint(tmp_path, model)), model


def test_an_inference_only_model_with_tied_weights_loads_a_file_saved_by_safetensors_save_model(
    services: Services, tmp_path: Path
) -> None:
    """`safetensors.torch.save_model` is how safetensors saves a module whose weights are tied
    (save_file refuses shared tensors): it keeps one name of each tied tensor, as Hugging Face
    files do (GPT-2's has no lm_head.weight), and `load_model` ties them back. The same file
    given as `pretrained_parameter_file` of a tied model must load; the service instead refuses
    to start: "Missing key(s) in state_dict: "head.weight"" (a strict load_state_dict)."""
    pretrained = tmp_path / "frozen.safetensors"
    module = zoo_apps.Small(99)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5)
    safetensors.torch.save_model(module, str(pretrained))
    services.env.update(ZOO_PRETRAINED=str(pretrained), ZOO_MODELS="1")
    inference = services.inference(f"{APPS}:small_zoo")
    expected = zoo_apps.Small(99)
    safetensors.torch.load_model(expected, str(pretrained))
    serve_module(expected, None)
    with torch.inference_mode():
        answer = expected.eval()(torch.from_numpy(X)).numpy()
    np.testing.assert_array_equal(infer(inference, "frozen")[1], answer)


@pytest.mark.parametrize("app", ["long_model_name", "dot_names"])
def test_a_model_name_that_cannot_name_a_file_is_refused_at_start_by_both_services(
    services: Services, tmp_path: Path, app: str
) -> None:
    """A model name of 240 characters ("zoo.éé…", 476 UTF-8 bytes: more than a file name may
    hold), or '.' and '..', which are directories of their own, used to pass App's check
    (non-empty, no '/'): the trainer trained and pushed such a model, then lost the runs at
    its first checkpoint ("File name too long"), and '..' stored the model's files outside
    `models/`. App refuses them as they are declared: both services stop at start (exit 2),
    naming the model."""
    for command in (
        inference_command(f"{APPS}:{app}", tmp_path / "ready.json"),
        trainer_command(f"{APPS}:{app}", ["127.0.0.1:1"], "--state-dir", str(tmp_path / "t")),
    ):
        done = subprocess.run(
            command, env=services.env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, done.stderr[-1500:]
        assert "model name" in done.stderr and "Traceback" not in done.stderr, done.stderr
