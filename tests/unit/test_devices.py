from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.cpus import available_cpus
from shared.devices import resolve_device
from shared.errors import ConfigurationError


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("100000 100000", 1), ("150000 100000", 2), ("1000 100000", 1)],
)
def test_a_container_cpu_quota_caps_the_cpus(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    found = available_cpus(tmp_path / "cpu.max")
    assert found == (affinity if expected is None else min(expected, affinity))


def test_no_cgroup_file_means_the_affinity_mask(tmp_path: Path) -> None:
    assert available_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_unknown_devices_are_configuration_errors() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigurationError, match="unknown device"):
        resolve_device("tpu:0")
