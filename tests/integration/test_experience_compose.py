"""docker-compose.yml's `online` profile, run as local processes (compose.py): the agent service
queries the model through the name `inference`, streams what it saw to `trainer` (which stands
for both trainer replicas: the group's writer and a standby), and the trainer trains on it alone
and pushes; every process stops cleanly."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as sync_pb
from shared.gen.weightsync.v1 import weightsync_pb2_grpc as sync_grpc
from tests.integration.compose import ROOT, Project
from tests.integration.conftest import wait_until


def test_the_online_profile_runs_the_agent_against_the_trainer_holding_its_buffer(
    tmp_path: Path,
) -> None:
    token = secrets.token_hex(16)
    env = {
        "WEIGHTSYNC_SYNC_TOKEN": token,
        "WEIGHTSYNC_EXPERIENCE_TOKEN": secrets.token_hex(16),
        "WEIGHTSYNC_APP": "examples.online:app",
        "TRAINER_GROUPS": "online",
        "COMPOSE_PROFILES": "online",
    }
    project = Project(tmp_path, [ROOT / "docker-compose.yml"], env)
    assert (
        "agent"
        not in Project(
            tmp_path / "plain", [ROOT / "docker-compose.yml"], env | {"COMPOSE_PROFILES": ""}
        ).services
    )  # only with the profile
    try:
        project.up()
        (inference,) = project.running("inference")
        (agent,) = project.running("agent")
        sync_port = project.services["inference"]["environment"]["INFERENCE_SYNC_LISTEN"]

        def version() -> int:
            with grpc.insecure_channel(f"{inference.address}:{sync_port.rsplit(':', 1)[1]}") as c:
                state: sync_pb.ModelState = sync_grpc.WeightSyncStub(c).GetModel(
                    sync_pb.GetModelRequest(model_name="online"),
                    timeout=10,
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            return state.version

        def acknowledged() -> int:
            rows = re.findall(r"^\s+\S+\s+\d+\s+\d+\s+\S+\s+(\d+)\s+(\d+)$", agent.output(), re.M)
            return int(rows[-1][0]) if rows else 0

        # The trainer trains only on what the agent streams (128 new samples a run): version 1
        # is its first push, the later ones are runs on the agent's samples.
        wait_until(lambda: acknowledged() >= 256 and version() >= 3, timeout=120)
        writer = [r for r in project.running("trainer") if "running trainer group" in r.output()]
        assert len(writer) == 1 and len(project.running("trainer")) == 2  # and one standby
        codes = project.down()
    finally:
        project.down()
    assert all(code == 0 for code in codes.values()), codes
    assert re.search(r"^collected (\d+), acknowledged \1, dropped 0$", agent.output(), re.M)
