"""An exclusive claim on a state directory, so that two processes never write the same one.

Replicas of one compose service share one volume. A state path may hold `{slot}`: the process
then takes the lowest-numbered directory nobody else holds (`/state/replica-{slot}` gives
`replica-0`, `replica-1`, ...), so each replica keeps state of its own and a restarted replica
gets a directory back. A path without `{slot}` is claimed as it is; a second process either
fails at once or, with `wait`, stands by until the holder exits (a trainer's hot standby).

The claim is an flock() on `<dir>/.lock`: the kernel drops it when the holder dies, kill -9
included, so a crashed process never leaves a stale claim behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigurationError

logger = logging.getLogger(__name__)

SLOT = "{slot}"
MAX_SLOTS = 64
LOCK_FILE = ".lock"


@dataclass
class StateDir:
    """A claimed state directory; held until `release()` or the process exits."""

    path: Path
    _handle: int

    def release(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)  # closing the descriptor drops the flock
            self._handle = -1


def claim(template: str | Path, *, wait: threading.Event | None = None) -> StateDir | None:
    """Claim the state directory `template` names (see the module's doc).

    With `wait`, a busy directory is retried every second until it frees up; None comes back
    if `wait` is set first. Without it, a busy directory raises ConfigurationError."""
    text = str(template)
    if SLOT in text:
        for slot in range(MAX_SLOTS):
            held = _try_lock(Path(text.replace(SLOT, str(slot))))
            if held is not None:
                return held
        raise ConfigurationError(f"all {MAX_SLOTS} state directories {text} are in use")
    path = Path(text)
    held = _try_lock(path)
    if held is not None or wait is None:
        if held is None:
            raise ConfigurationError(
                f"state directory {path} is in use by another process ({_holder(path)})"
            )
        return held
    logger.warning(
        "state directory %s is held by another process (%s): standing by until it exits",
        path,
        _holder(path),
    )
    while not wait.wait(1.0):
        held = _try_lock(path)
        if held is not None:
            logger.info("state directory %s is free: taking over", path)
            return held
    return None


def claim_first(
    candidates: Sequence[Path], *, wait: threading.Event
) -> tuple[int, StateDir] | None:
    """Claim the first of `candidates` nobody holds; return its index and the claim. When all
    are held, stand by until one frees up (None: `wait` was set first)."""
    announced = False
    while True:
        for index, path in enumerate(candidates):
            held = _try_lock(path)
            if held is not None:
                if announced:
                    logger.info("state directory %s is free: taking over", path)
                return index, held
        if not announced:
            logger.warning(
                "every state directory (%s) is held by another process: standing by until one "
                "exits",
                ", ".join(str(p) for p in candidates),
            )
            announced = True
        if wait.wait(1.0):
            return None


def _try_lock(path: Path) -> StateDir | None:
    """The claim on `path`; None when another process holds it. ConfigurationError, naming the
    directory, when it cannot be created or written (a full disk, a file in its place)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unusable(path, exc) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return None
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
    except OSError as exc:
        os.close(handle)
        raise _unusable(path, exc) from None
    return StateDir(path, handle)


def _unusable(path: Path, exc: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"state directory {path} cannot be used: {exc.strerror or exc} "
        f"({exc.filename or path / LOCK_FILE})"
    )


def _holder(path: Path) -> str:
    try:
        return (path / LOCK_FILE).read_text().strip() or "unknown holder"
    except OSError:
        return "unknown holder"
