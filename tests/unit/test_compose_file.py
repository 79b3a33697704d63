"""docker-compose.yml and the code agree: every variable it sets is a flag the service declares,
and the command each service runs is one of our console scripts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from inference_service.settings import OPTIONS as INFERENCE_OPTIONS
from trainer_service.settings import OPTIONS as TRAINER_OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_the_compose_file_sets_is_declared() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    declared = {o.env for o in (*INFERENCE_OPTIONS, *TRAINER_OPTIONS)}
    used = set(re.findall(r"^\s+((?:INFERENCE|TRAINER)_[A-Z_]+):", text, re.MULTILINE))
    assert used, "the compose file sets no service variables"
    assert used <= declared, f"not declared by any service: {sorted(used - declared)}"
    assert {"INFERENCE_MODELS", "TRAINER_MODELS", "TRAINER_INFERENCE"} <= used


def test_commands_are_console_scripts_and_ports_match() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for command in re.findall(r'command: \["([a-z-]+)"', text):
        assert command in scripts
    listen = re.search(r"INFERENCE_LISTEN: 0\.0\.0\.0:(\d+)", text)
    sync = re.search(r"INFERENCE_SYNC_LISTEN: 0\.0\.0\.0:(\d+)", text)
    target = re.search(r"TRAINER_INFERENCE: inference:(\d+)", text)
    health = re.search(r'"shared\.healthcheck", "127\.0\.0\.1:(\d+)"', text)
    published = re.findall(r'- "(\d+):(\d+)"', text)
    assert listen and sync and target and health
    assert target.group(1) == sync.group(1)  # trainers reach the sync plane
    assert health.group(1) == listen.group(1)  # the health check probes the data plane
    assert published == [(listen.group(1), listen.group(1))]  # only the data plane is published
