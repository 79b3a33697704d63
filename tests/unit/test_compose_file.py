"""docker-compose.yml (and its GPU overlay) agree with the code: every variable a service sets is
a flag that service declares, every command is one of our console scripts, and the ports line
up. tests/integration/test_compose.py then runs the file."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from inference_service.settings import OPTIONS as INFERENCE_OPTIONS
from tests.integration.compose import ROOT, load
from trainer_service.settings import OPTIONS as TRAINER_OPTIONS

DECLARED = {
    "inference-service": {o.env for o in INFERENCE_OPTIONS},
    "trainer-service": {o.env for o in TRAINER_OPTIONS},
}


@pytest.fixture(params=[["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def services(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    document = load([ROOT / name for name in request.param], {"WEIGHTSYNC_SYNC_TOKEN": "t"})
    services: dict[str, dict[str, Any]] = document["services"]
    # The services `docker compose up` runs; the agent (profile online) has a test of its own.
    return {name: spec for name, spec in services.items() if not spec.get("profiles")}


def test_the_online_profile_runs_the_agent_example_against_both_tiers() -> None:
    services = load([ROOT / "docker-compose.yml"], {"WEIGHTSYNC_SYNC_TOKEN": "t"})["services"]
    agent = services["agent"]
    assert agent["profiles"] == ["online"]
    command = agent["command"]
    assert command[:2] == ["python", "examples/agent.py"] and (ROOT / command[1]).is_file()
    data = services["inference"]["environment"]["INFERENCE_LISTEN"].rsplit(":", 1)[1]
    experience = services["trainer"]["environment"]["TRAINER_EXPERIENCE_LISTEN"].rsplit(":", 1)[1]
    assert command[command.index("--inference") + 1] == f"inference:{data}"
    assert command[command.index("--trainer") + 1] == f"trainer:{experience}"
    assert set(agent["depends_on"]) == {"inference", "trainer"}


def test_every_variable_is_a_flag_of_the_command_that_reads_it(
    services: dict[str, dict[str, Any]],
) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, service in services.items():
        (command,) = service["command"]
        assert command in scripts and command in DECLARED, name
        assert set(service["environment"]) <= DECLARED[command], name


def test_the_trainer_replicas_split_the_groups_one_model_each(
    services: dict[str, dict[str, Any]],
) -> None:
    from examples.two_models import app
    from shared.cli import name_groups

    trainer = services["trainer"]
    groups = name_groups(trainer["environment"]["TRAINER_GROUPS"])
    assert trainer["deploy"]["replicas"] == len(groups) == len(app.models)
    assert sorted(name for group in groups for name in group) == sorted(app.trainers)


def test_only_the_data_plane_is_published_and_everything_points_at_the_right_port(
    services: dict[str, dict[str, Any]],
) -> None:
    inference = services["inference"]
    listen = inference["environment"]["INFERENCE_LISTEN"].rsplit(":", 1)[1]
    sync = inference["environment"]["INFERENCE_SYNC_LISTEN"].rsplit(":", 1)[1]
    assert [p.rsplit(":", 1)[1] for p in inference["ports"]] == [listen]
    assert inference["healthcheck"]["test"][-1] == f"127.0.0.1:{listen}"
    trainers = [s for s in services.values() if s["command"] == ["trainer-service"]]
    assert trainers
    for trainer in trainers:
        assert "ports" not in trainer
        assert trainer["environment"]["TRAINER_INFERENCE"] == f"inference:{sync}"
        assert trainer["depends_on"]["inference"]["condition"] == "service_healthy"
    for service in services.values():
        assert service["stop_grace_period"] and service["volumes"]


def test_the_image_installs_every_runtime_dependency() -> None:
    """docker/Dockerfile installs the package with --no-deps after naming its dependencies by
    hand (so the torch layer stays cached), so a dependency added to pyproject.toml alone
    would be missing from the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]
    }
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    installed = {
        re.split(r"[<>=!~\[]", token.strip("\"'"), maxsplit=1)[0].lower()
        for line in dockerfile.splitlines()
        if line.startswith("RUN pip install")
        for command in line.split("&&")
        if "pip install" in command
        for token in command.split("pip install", 1)[1].split()
        if not token.startswith("-") and not token.startswith("$") and token not in (".",)
    }
    assert wanted - installed == set()
