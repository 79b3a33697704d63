"""docker-compose.yml, run as the local processes it declares (see compose.py): two inference
replicas behind one name, two trainers on two models, scaling both tiers while they run.

Everything here comes from the compose file: commands, environment, ports, volumes, health
checks, grace periods. When the file and the code disagree (a flag the service lacks, a port the
trainers cannot reach, a health check on the wrong port), these tests fail.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from inference_service.client import InferenceClient
from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc
from tests.integration.compose import ROOT, ComposeError, Project, Replica, interpolate, seconds
from tests.integration.conftest import wait_until

MODELS = ("sine", "cosine")


def _port(value: str) -> str:
    return value.rsplit(":", 1)[1]


class Deployment:
    def __init__(self, project: Project, token: str) -> None:
        self.project = project
        self.token = token
        inference = project.services["inference"]["environment"]
        self.data_port = _port(inference["INFERENCE_LISTEN"])
        self.sync_port = _port(inference["INFERENCE_SYNC_LISTEN"])

    def state(self, replica: Replica, model: str) -> sync_pb.ModelState:
        with grpc.insecure_channel(f"{replica.address}:{self.sync_port}") as channel:
            return sync_grpc.WeightSyncStub(channel).GetModel(
                sync_pb.GetModelRequest(model_name=model),
                timeout=10,
                metadata=(("authorization", f"Bearer {self.token}"),),
            )

    def versions(self, model: str) -> list[int]:
        return [self.state(r, model).version for r in self.project.running("inference")]

    def infer(self, replica: Replica, model: str) -> tuple[int, torch.Tensor]:
        with InferenceClient(f"{replica.address}:{self.data_port}") as client:
            result = client.infer(model, {"x": torch.linspace(-1, 1, 5).unsqueeze(1)})
        return result.version, result.outputs["y"]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    token = secrets.token_hex(16)
    project = Project(tmp_path, [ROOT / "docker-compose.yml"], {"WEIGHTSYNC_SYNC_TOKEN": token})
    try:
        yield Deployment(project, token)
    finally:
        project.down()


def test_two_trainers_two_models_two_replicas_then_scale_both_tiers(
    deployment: Deployment,
) -> None:
    project = deployment.project
    project.up(scale={"inference": 2})  # and the two trainer replicas the file declares
    first, second = project.running("inference")
    assert len(project.running("trainer")) == 2

    # Both trainers push their own model to both replicas behind the one name `inference`.
    wait_until(lambda: all(min(deployment.versions(m)) >= 3 for m in MODELS), timeout=90)
    holders = {m: deployment.state(first, m).lease_holder for m in MODELS}
    assert holders["sine"] and holders["cosine"] and holders["sine"] != holders["cosine"]
    for replica in (first, second):
        for model in MODELS:
            version, y = deployment.infer(replica, model)
            assert version >= 3 and y.shape == (5, 1) and torch.isfinite(y).all()

    # A third replica joins behind the same name and is caught up by the trainers' next pushes.
    (third,) = project.scale("inference", 3)
    wait_until(lambda: all(deployment.state(third, m).version >= 1 for m in MODELS), timeout=60)
    assert (ROOT / "examples").is_dir()
    slots = sorted(p.name for p in project.volume("inference-state").iterdir())
    assert slots == ["replica-0", "replica-1", "replica-2"]  # one state directory per replica

    # A third trainer replica finds both groups taken and stands by; when the sine writer is
    # killed it takes the sine group over from its last checkpoint, and the versions go on.
    sine_writer = next(r for r in project.running("trainer") if "group sine" in r.output())
    (standby,) = project.scale("trainer", 3)
    wait_until(lambda: "standing by" in standby.output(), timeout=30)
    before = deployment.state(first, "sine")
    wait_until(lambda: deployment.state(first, "sine").version > before.version + 2, timeout=60)
    assert deployment.state(first, "sine").lease_holder == before.lease_holder
    project.kill(sine_writer)
    wait_until(
        lambda: deployment.state(first, "sine").lease_holder != before.lease_holder, timeout=90
    )
    assert "running trainer group sine" in standby.output()
    taken_over = deployment.state(first, "sine").version
    wait_until(lambda: min(deployment.versions("sine")) > taken_over, timeout=60)

    # Trainers first, then replicas: every process stops cleanly within its grace period, and
    # every replica ends up serving the same bits of each model.
    for replica in project.running("trainer"):
        assert project.stop(replica) == 0, replica.output()
    for model in MODELS:
        states = [deployment.state(r, model) for r in project.running("inference")]
        assert len({(s.version, s.digest) for s in states}) == 1, states
    codes = project.down()
    assert all(code == 0 for name, code in codes.items() if name != sine_writer.name)


def test_the_gpu_variant_reserves_a_device_for_inference_only(tmp_path: Path) -> None:
    files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"]
    project = Project(tmp_path, files, {"WEIGHTSYNC_SYNC_TOKEN": "t"})
    inference = project.services["inference"]
    (device,) = inference["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert inference["environment"]["INFERENCE_DEVICE"] == "cuda"
    assert inference["environment"]["INFERENCE_MODELS"]  # the overlay merged, not replaced
    assert "cu" in inference["build"]["args"]["TORCH_INDEX_URL"]
    trainer = project.services["trainer"]
    assert "resources" not in trainer.get("deploy", {})  # trainers stay on the CPU here


def test_the_sync_token_is_required(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="WEIGHTSYNC_SYNC_TOKEN"):
        Project(tmp_path, [ROOT / "docker-compose.yml"], {})


def test_a_command_the_image_lacks_fails(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    text = (ROOT / "docker-compose.yml").read_text()
    broken.write_text(text.replace('["inference-service"]', '["inference-server"]'))
    project = Project(tmp_path, [broken], {"WEIGHTSYNC_SYNC_TOKEN": "t"})
    with pytest.raises(ComposeError, match="inference-server"):
        project.up()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "1"),
        ("${B:-x}", "x"),
        ("${E:-x}", "x"),
        ("${E-x}", ""),
        ("$${A}", "${A}"),
        ("a${A}b${B:-}c", "a1bc"),
    ],
)
def test_interpolation_follows_compose(text: str, expected: str) -> None:
    assert interpolate(text, {"A": "1", "E": ""}) == expected


def test_durations() -> None:
    assert seconds("30s") == 30 and seconds("1m30s") == 90 and seconds("500ms") == 0.5
    with pytest.raises(ComposeError):
        seconds("30 seconds")
