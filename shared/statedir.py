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
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigurationError

logger = logging.getLogger(__name__)

SLOT = "{slot}"
MAX_SLOTS = 64
LOCK_FILE = ".lock"


@dataclass
class StateDir:
    """A claimed state directory (and the claims that came with it: `claim_first`'s members);
    held until `release()` or the process exits."""

    path: Path
    _handle: int
    _members: list[int] = field(default_factory=list)

    def still_held(self) -> bool:
        """Whether the directory at `path` is still the one claimed: its lock file not
        removed or replaced since (a directory deleted under a holder is another's once a
        standby makes it again)."""
        if self._handle < 0:
            return False
        try:
            now = os.stat(self.path / LOCK_FILE)
        except OSError:
            return False
        held = os.fstat(self._handle)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        for handle in [self._handle, *self._members]:
            if handle >= 0:
                os.close(handle)  # closing the descriptor drops the flock
        self._handle = -1
        self._members.clear()


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
    candidates: Sequence[Path],
    *,
    wait: threading.Event,
    members: Sequence[Sequence[Path]] | None = None,
) -> tuple[int, StateDir] | None:
    """Claim the first of `candidates` nobody holds, together with every lock file of its
    `members` (one list per candidate: what else a candidate's holder must hold alone, as a
    trainer group's trainers, whichever group names them); return its index and the claim.
    When none can be claimed whole, stand by until one can (None: `wait` was set first)."""
    announced = False
    while True:
        busy: list[str] = []
        for index, path in enumerate(candidates):
            held = _try_lock(path)
            if held is None:
                busy.append(f"{path} ({_holder(path)})")
                continue
            taken = _take_members(held, members[index] if members is not None else ())
            if taken is not None:
                busy.append(taken)
                held.release()
                continue
            if announced:
                logger.info("state directory %s is free: taking over", path)
            return index, held
        if not announced:
            logger.warning(
                "every state directory is held by another process, or shares what it holds "
                "(%s): standing by until one exits",
                "; ".join(busy),
            )
            announced = True
        if wait.wait(1.0):
            return None


def _take_members(held: StateDir, paths: Sequence[Path]) -> str | None:
    """Lock each of `paths` for `held`; None when all are, else who holds the one that was
    not (the ones taken are let go again by the caller's release)."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unusable(path.parent, exc) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return f"{path} ({_read(path)})"
        held._members.append(handle)
        try:
            os.ftruncate(handle, 0)
            os.write(handle, f"pid {os.getpid()} on {os.uname().nodename}, {held.path}\n".encode())
        except OSError as exc:
            raise _unusable(path.parent, exc) from None
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
    return _read(path / LOCK_FILE)


def _read(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "unknown holder"
    except OSError:
        return "unknown holder"
