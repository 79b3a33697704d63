"""The trainer's checkpoint: models, optimizer and trainer state, replaced as a whole.

A checkpoint is written into a fresh directory, every file fsynced, then swapped in by two
renames (`checkpoint` -> `.checkpoint-old`, new -> `checkpoint`); a crash between them leaves
`.checkpoint-old`, which loading falls back to. So a trainer killed at any moment resumes from
its last complete checkpoint, never a mix of two.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

CURRENT = "checkpoint"
OLD = ".checkpoint-old"
NEXT = ".checkpoint-next"


class Checkpoints:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def current(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        for name in (CURRENT, OLD):
            path = self.state_dir / name
            if path.is_dir():
                return path
        return None

    def write(self, fill: Callable[[Path], None]) -> Path:
        """Let `fill` write a checkpoint into a new directory, then make it the current one."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        staging = self.state_dir / NEXT
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        fill(staging)
        for root, _dirs, files in os.walk(staging):
            for file in files:
                with open(os.path.join(root, file), "rb") as written:
                    os.fsync(written.fileno())
        current, old = self.state_dir / CURRENT, self.state_dir / OLD
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            os.rename(current, old)
        os.rename(staging, current)
        shutil.rmtree(old, ignore_errors=True)
        handle = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        return current
