"""The named network namespaces of host labs (bench/hostlab.py): create-side checks, listing,
and removal, including what a lab killed outright left behind.

A lab's namespaces are named `PREFIX<pid>x<serial>-<role>`, after the process that made them: a
run killed outright leaves namespaces whose names carry its dead process id, and `remove_stale`
(called as every lab starts) removes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

PREFIX = "wslab"  # every lab namespace's name starts with it, then the owner's process id
NETNS_ETC = Path("/etc/netns")


class LabError(RuntimeError):
    """An `ip`/`tc` command of the lab failed."""


class LabUnavailableError(LabError):
    """The lab cannot run here (not root, no iproute2, namespaces refused); the message says
    why."""


def unavailable() -> str | None:
    """Why no lab can run here, or None when it might (creating a namespace is the proof)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the host lab needs root (network namespaces, veth, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the host lab needs iproute2: {', '.join(missing)} not found"
    return None


def run_tool(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def namespaces() -> list[str]:
    """Every named network namespace (`ip netns list` prints `name (id: N)` or `name`)."""
    listed = run_tool(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str, prefix: str) -> int | None:
    """The process id in a lab namespace's name, None for a name not of this prefix."""
    found = re.match(rf"^{re.escape(prefix)}(\d+)x\d+-", name)
    return int(found.group(1)) if found else None


def remove_namespace(name: str) -> None:
    """Kill what still runs in namespace `name` (only lab code starts processes there), delete
    it and its /etc/netns folder."""
    pids = run_tool(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run_tool(["ip", "netns", "del", name], check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Remove the namespaces (and /etc/netns folders) of labs whose process is gone; the names
    removed."""
    removed = []
    for name in namespaces():
        owner = owner_pid(name, prefix)
        if owner is not None and not pid_alive(owner):
            remove_namespace(name)
            removed.append(name)
    if NETNS_ETC.is_dir():
        for folder in NETNS_ETC.iterdir():
            owner = owner_pid(folder.name, prefix)
            if owner is not None and not pid_alive(owner):
                shutil.rmtree(folder, ignore_errors=True)
    return removed
