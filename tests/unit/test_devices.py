from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.cpus import available_cpus
from shared.devices import resolve_device, torch_thread_count
from shared.errors import ConfigurationError

AFFINITY = len(os.sched_getaffinity(0))


def cgroup(root: Path, membership: str, files: dict[str, str]) -> int:
    """available_cpus() with `files` (paths under `root`) as the cgroup tree."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (root / "self-cgroup").write_text(membership)
    return available_cpus(root, root / "self-cgroup")


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("100000 100000", 1), ("150000 100000", 2), ("1000 100000", 1)],
)
def test_a_container_cpu_quota_caps_the_cpus(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    found = cgroup(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert found == (AFFINITY if expected is None else min(expected, AFFINITY))


@pytest.mark.parametrize(
    ("quota", "expected"), [("-1", None), ("100000", 1), ("250000", 3), ("5000", 1)]
)
def test_a_cgroup_v1_quota_caps_the_cpus_too(
    tmp_path: Path, quota: str, expected: int | None
) -> None:
    files = {"cpu/cpu.cfs_quota_us": quota, "cpu/cpu.cfs_period_us": "100000"}
    found = cgroup(tmp_path, "4:cpu,cpuacct:/\n1:name=systemd:/\n", files)
    assert found == (AFFINITY if expected is None else min(expected, AFFINITY))


def test_the_tightest_quota_on_the_process_s_cgroup_or_above_it_wins(tmp_path: Path) -> None:
    files = {
        "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "100000 100000",  # the pod's limit: one CPU
        "kubepods/pod1/app/cpu.max": "400000 100000",
        "other/cpu.max": "10000 100000",  # not this process's
    }
    assert cgroup(tmp_path, "0::/kubepods/pod1/app\n", files) == 1


def test_inside_a_container_the_mount_s_own_quota_counts(tmp_path: Path) -> None:
    """Without a cgroup namespace /proc/self/cgroup names the host's path, which the
    container's mount does not have; the mount itself is the container's cgroup."""
    files = {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}
    assert cgroup(tmp_path, "4:cpu,cpuacct:/docker/0123abcd\n", files) == 1


def test_no_cgroup_files_means_the_affinity_mask(tmp_path: Path) -> None:
    assert available_cpus(tmp_path, tmp_path / "missing") == AFFINITY


def test_unknown_devices_are_configuration_errors() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigurationError, match="unknown device"):
        resolve_device("tpu:0")


@pytest.mark.parametrize(
    ("threads", "omp", "expected"),
    [
        (3, "7", 3),
        (0, "7", 7),
        (0, "1", 1),
        (0, "0", None),  # None: the CPUs the process may use
        (0, "many", None),
        (0, None, None),
    ],
)
def test_the_torch_thread_count_honours_the_flag_then_omp_num_threads_then_the_cpus(
    threads: int, omp: str | None, expected: int | None
) -> None:
    environ = {} if omp is None else {"OMP_NUM_THREADS": omp}
    assert torch_thread_count(threads, environ) == (expected or available_cpus())
