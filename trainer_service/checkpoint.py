"""The trainer's checkpoint: models, optimizer and trainer state, replaced as a whole.

A new checkpoint replaces the last one in steps, each durable before the next begins:

1. written: it is written into `.checkpoint-next`, with a `.manifest.json` giving every file's
   size and xxh3_128 hash (it guards against corruption, as the weights' digest does:
   shared/weights/digest.py), every file and directory fsynced, then marked complete by a
   `.complete` file, fsynced too;
2. set aside: `checkpoint` is renamed to `.checkpoint-old`;
3. swapped: `.checkpoint-next` is renamed to `checkpoint`;
4. cleaned: `.checkpoint-old` is deleted.

The parent directory is fsynced after every rename. Nothing complete is deleted before a newer
complete checkpoint is in place, so a crash at any point, or a second one while recovering,
leaves a complete checkpoint: `current()` finds the newest (a complete `.checkpoint-next`, else
`checkpoint`, else `.checkpoint-old`), and the next write first finishes an interrupted swap
(`recover()`). A trainer killed at any moment resumes from its last complete checkpoint, never
a mix of two and never from nothing. A write that fails (a full disk) removes what it wrote and
raises StateWriteError; the last complete checkpoint stays as it was.

Before resuming, `verify()` checks every file against the manifest: a checkpoint damaged on disk
(a file cut short, a byte flipped, one missing or replaced by a directory, the manifest itself
missing) raises ConfigurationError naming the file, rather than training on, and pushing,
weights nobody wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash
from safetensors import SafetensorError

from shared.durable import fsync_path
from shared.errors import ConfigurationError, StateWriteError

logger = logging.getLogger(__name__)

CURRENT = "checkpoint"
OLD = ".checkpoint-old"
NEXT = ".checkpoint-next"
COMPLETE = ".complete"
MANIFEST = ".manifest.json"
HASH = "xxh3_128"  # the manifest's hash of each file


class Checkpoints:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def current(self) -> Path | None:
        """The newest complete checkpoint, if any; changes nothing on disk.

        Raises:
            ConfigurationError: `checkpoint` or `.checkpoint-old` is there but is no directory
                (starting afresh would push untrained weights over the trained ones).
        """
        staged = self.state_dir / NEXT
        if (staged / COMPLETE).is_file():
            return staged
        for name in (CURRENT, OLD):
            path = self.state_dir / name
            if path.is_dir():
                return path
            if path.exists() or path.is_symlink():
                raise ConfigurationError(
                    f"checkpoint {path} is not a directory; the trainer does not start afresh "
                    "over it. Restore the state directory from a backup, or move it away to "
                    "start afresh"
                )
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
        try:
            staged.mkdir()
            fill(staged)
            _write_manifest(staged)
            _fsync_tree(staged)
            marker = staged / COMPLETE
            with marker.open("wb") as out:
                os.fsync(out.fileno())
            fsync_path(staged)
            fsync_path(self.state_dir)
        except (OSError, SafetensorError) as exc:  # safetensors wraps the OSError in its own
            _discard_quietly(staged)  # what it took (on a full disk) is given back
            kept = self.current()
            raise StateWriteError(
                f"checkpoint not written to {self.state_dir}: {exc}; "
                + (f"the last complete one, {kept}, is kept" if kept else "there is none yet")
            ) from exc
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

    def verify(self, checkpoint: Path) -> None:
        """Check every file of `checkpoint` against its manifest. Every checkpoint this trainer
        writes has one, so a checkpoint without it is damaged (or written by a trainer from
        before manifests, whose files nothing can vouch for): it is refused like one whose file
        is missing.

        Raises:
            ConfigurationError: The manifest or a file is missing, a file is there that the
                manifest does not list, or a size or hash differs.
        """
        manifest = checkpoint / MANIFEST

        def refuse(problem: str) -> ConfigurationError:
            return ConfigurationError(
                f"checkpoint {checkpoint} is damaged: {problem}; the trainer does not resume "
                "from it. Restore the state directory from a backup, or move it away to start "
                "afresh"
            )

        if not manifest.is_file():
            raise refuse(f"its manifest {manifest} is missing")
        try:
            listed = json.loads(manifest.read_text())
            files = {str(k): (int(v["size"]), str(v[HASH])) for k, v in listed.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise refuse(f"{manifest} cannot be read ({exc})") from None
        present = {
            path.relative_to(checkpoint).as_posix()
            for path in checkpoint.rglob("*")
            if not path.is_dir() and path.name not in (MANIFEST, COMPLETE)
        }
        unlisted = sorted(present - files.keys())
        if unlisted:  # a manifest replaced or cut down: what it no longer vouches for
            raise refuse(f"{checkpoint / unlisted[0]} is not in its manifest {manifest}")
        for name, (size, digest) in sorted(files.items()):
            path = checkpoint / name
            if not path.is_file():
                raise refuse(f"{path} is missing or not a file")
            if path.stat().st_size != size:
                raise refuse(f"{path} holds {path.stat().st_size} bytes, not {size}")
            if _hash(path) != digest:
                raise refuse(f"{path} does not match its hash")

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


def _write_manifest(root: Path) -> None:
    """Record the size and hash of every file under `root` in `root/MANIFEST`."""
    files = {
        path.relative_to(root).as_posix(): {"size": path.stat().st_size, HASH: _hash(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
    (root / MANIFEST).write_text(json.dumps(files, indent=1))


def _hash(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, `root` included, made durable."""
    for directory, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory, name))
        fsync_path(Path(directory))


def _discard_quietly(path: Path) -> None:
    """`_discard`, logging rather than raising what stops it."""
    try:
        _discard(path)
    except OSError as exc:
        logger.error("cannot remove the partial checkpoint %s: %s", path, exc)


def _discard(path: Path) -> None:
    """Delete a checkpoint directory, its completion marker first (a deletion cut short never
    leaves a directory that claims to be complete)."""
    if not path.exists():
        return
    (path / COMPLETE).unlink(missing_ok=True)
    fsync_path(path)
    shutil.rmtree(path)
