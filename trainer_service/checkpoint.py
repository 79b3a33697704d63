"""The trainer's checkpoint: models, optimizer and trainer state, replaced as a whole.

A new checkpoint replaces the last one in steps, each durable before the next begins:

1. written: it is written into `.checkpoint-next`, every file and directory fsynced, then
   marked complete by a `.complete` file, fsynced too;
2. set aside: `checkpoint` is renamed to `.checkpoint-old`;
3. swapped: `.checkpoint-next` is renamed to `checkpoint`;
4. cleaned: `.checkpoint-old` is deleted.

The parent directory is fsynced after every rename. Nothing complete is deleted before a newer
complete checkpoint is in place, so a crash at any point, or a second one while recovering,
leaves a complete checkpoint: `current()` finds the newest (a complete `.checkpoint-next`, else
`checkpoint`, else `.checkpoint-old`), and the next write first finishes an interrupted swap
(`recover()`). A trainer killed at any moment resumes from its last complete checkpoint, never
a mix of two and never from nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from shared.durable import fsync_path

CURRENT = "checkpoint"
OLD = ".checkpoint-old"
NEXT = ".checkpoint-next"
COMPLETE = ".complete"


class Checkpoints:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def current(self) -> Path | None:
        """The newest complete checkpoint, if any; changes nothing on disk."""
        staged = self.state_dir / NEXT
        if (staged / COMPLETE).is_file():
            return staged
        for name in (CURRENT, OLD):
            path = self.state_dir / name
            if path.is_dir():
                return path
        return None

    def write(self, fill: Callable[[Path], None]) -> Path:
        """Let `fill` write a checkpoint into a new directory, then make it the current one."""
        for _ in self.steps(fill):
            pass
        return self.state_dir / CURRENT

    def steps(self, fill: Callable[[Path], None]) -> Iterator[str]:
        """`write`, one durable step at a time: yields the name of each step once it is done
        (a caller that stops iterating leaves the directory as a crash there would)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        current, old, staged = (self.state_dir / n for n in (CURRENT, OLD, NEXT))
        self.recover()
        yield "recovered"
        staged.mkdir()
        fill(staged)
        _fsync_tree(staged)
        marker = staged / COMPLETE
        with marker.open("wb") as out:
            os.fsync(out.fileno())
        fsync_path(staged)
        fsync_path(self.state_dir)
        yield "written"
        if current.exists():
            os.rename(current, old)
            fsync_path(self.state_dir)
        yield "set aside"
        os.rename(staged, current)
        fsync_path(self.state_dir)
        yield "swapped"
        _discard(old)
        fsync_path(self.state_dir)
        yield "cleaned"

    def recover(self) -> None:
        """Finish or undo a swap a crash interrupted, leaving `checkpoint` (if any checkpoint
        is complete) and nothing else."""
        if not self.state_dir.is_dir():
            return
        current, old, staged = (self.state_dir / n for n in (CURRENT, OLD, NEXT))
        if staged.exists() and not (staged / COMPLETE).is_file():
            _discard(staged)  # a write cut short: never complete, so never read
        if staged.exists():  # complete, and the newest: finish its swap
            if current.exists():
                _discard(old)  # `checkpoint` and `.checkpoint-next` are both complete
                os.rename(current, old)
                fsync_path(self.state_dir)
            os.rename(staged, current)
            fsync_path(self.state_dir)
        if not current.exists() and old.exists():
            os.rename(old, current)
            fsync_path(self.state_dir)
        if current.exists():
            _discard(old)
        fsync_path(self.state_dir)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, `root` included, made durable."""
    for directory, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory, name))
        fsync_path(Path(directory))


def _discard(path: Path) -> None:
    """Delete a checkpoint directory, its completion marker first (a deletion cut short never
    leaves a directory that claims to be complete)."""
    if not path.exists():
        return
    (path / COMPLETE).unlink(missing_ok=True)
    fsync_path(path)
    shutil.rmtree(path)
