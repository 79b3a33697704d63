"""How many CPUs this process may use. No torch here: the sync relay imports it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> int:
    """CPUs this process may use: its affinity mask, capped by the tightest CPU quota on its
    cgroup or any above it (a container's `--cpus`, a Kubernetes CPU limit), cgroup v2 or v1.
    os.cpu_count() and torch's defaults both ignore quotas."""
    cpus = len(os.sched_getaffinity(0))
    quotas = [quota for quota in map(_quota, _cgroups(root, membership)) if quota is not None]
    if not quotas:
        return cpus
    return max(1, min(cpus, math.ceil(min(quotas))))


def _cgroups(root: Path, membership: Path) -> Iterator[Path]:
    """The directories of this process's CPU cgroup and of those above it, v2 and v1.

    Inside a container the cgroup mount is the container's own cgroup, whatever path
    /proc/self/cgroup names, so the mount's root is always among them."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    places = {(root, "/"), (root / "cpu", "/")}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            places.add((root, path))  # the v2 hierarchy
        elif "cpu" in controllers.split(","):
            places.add((root / "cpu", path))
    for mount, path in places:
        directory = mount / path.lstrip("/")
        for place in (directory, *directory.parents):
            if place == mount or mount in place.parents:
                yield place


def _quota(directory: Path) -> float | None:
    """The CPUs that a cgroup's quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), if any."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        allowed, every = int(quota), int(period)
    except ValueError:  # v2's "max"
        return None
    return allowed / every if allowed > 0 and every > 0 else None  # v1: -1 is none
