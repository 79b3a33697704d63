"""Keep each model's recent committed versions on disk; serve the newest again after a restart.

After every commit a background thread writes the live generation to
`<state-dir>/models/<model>/<version>.safetensors` (temp file, fsync, rename, fsync of the
directory), with its version, writer, digest and commit time in the safetensors metadata, and
keeps the newest `history` files. Commits that land while a write runs are coalesced: the newest
version is written next. At start, the newest file whose tensors match the model and whose digest
checks out is loaded, with its version, before the service reports ready; newer files that fail
are renamed `*.corrupt`. Files none of which checks out stop the start (ConfigurationError), as
the initial weights would then be served under version numbers already used. The files are the
history an operator lists and rolls back to.

Writing history never holds up a push. The writer does not pin the generation it writes: it
copies one chunk at a time while no push can start overwriting that module
(`ServedModel.unchanged`), and writes the copy with no lock held, however slow the disk. If a
push has taken the module over meanwhile, a newer version is live and the file is given up.
A failed write leaves no temp file behind (nor does a crash, after the next start); out of disk
space, the older versions are removed, all but the newest one, and the write is tried once more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from inference_service.served_model import Generation, ServedModel
from shared.durable import fsync_path
from shared.errors import ConfigurationError, ModelNotFoundError, StoredVersionDamagedError
from shared.weights.digest import tensor_hashes
from shared.weights.layout import TensorLayout
from shared.weights.writer import Payload

logger = logging.getLogger(__name__)

WriteChunk = Callable[[int, bytes], None]
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# The most a push waits to start while the history writer copies (one chunk's copy).
WRITE_CHUNK_BYTES = 4 << 20
HISTORY = 5  # committed versions kept per model (--history)


PROBE_BYTES = 4096  # written at start to each model's history directory, then removed


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the file descriptor `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True)
class StoredVersion:
    version: int
    writer_id: str
    digest: bytes
    committed_at: float
    path: Path
    size_bytes: int  # as read with the rest: the file may be pruned right after

    @classmethod
    def from_file(cls, path: Path) -> StoredVersion:
        """The version a weights file holds, from its metadata; raises what reading a damaged
        file raises (safetensors' own errors among them)."""
        size = path.stat().st_size
        with safe_open(str(path), framework="pt") as stored:
            meta = stored.metadata() or {}
        return cls(
            int(meta["version"]),
            meta.get("writer_id", ""),
            bytes.fromhex(meta["digest"]),
            float(meta.get("committed_at", "0")),
            path,
            size,
        )

    def chunks(self, size: int = 4 << 20) -> Iterator[bytes]:
        with self.path.open("rb") as file:
            while chunk := file.read(size):
                yield chunk


def file_name(version: int) -> str:
    """The name of the file that holds `version` (twelve digits at least, more past them)."""
    return f"{version:012d}.safetensors"


def newest_first(directory: Path) -> list[Path]:
    """The weights files in `directory`, newest version first: ordered by the number their
    names hold (as strings, version 10^12 would sort below 999999999999); a name that holds
    none comes first, to be checked (and set aside) before any version is restored."""

    def number(path: Path) -> tuple[bool, int, str]:
        digits = path.stem.isdigit()
        return (not digits, int(path.stem) if digits else 0, path.name)

    return sorted(directory.glob("*.safetensors"), key=number, reverse=True)


class WeightStore:
    """The history on disk. `write` writes one chunk to a file descriptor (tests pass a slow or
    failing one); `chunk_bytes` is how much is copied at a time."""

    def __init__(
        self,
        root: Path,
        history: int = HISTORY,
        *,
        write: WriteChunk = write_all,
        chunk_bytes: int = WRITE_CHUNK_BYTES,
    ) -> None:
        self.root = root
        self.history = max(1, history)
        self._write_chunk = write
        self._chunk_bytes = chunk_bytes
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in its place, a read-only or full disk
            raise ConfigurationError(
                f"the weights history {root} cannot be used: {exc.strerror or exc}; it must be "
                "a directory the service can write (move what is there away)"
            ) from None
        self._remove_stale_temp_files()

    def _dir(self, name: str) -> Path:
        return self.root / name

    @staticmethod
    def _check_writable(directory: Path) -> None:
        """ConfigurationError, naming `directory`, when a page cannot be written there (a full
        disk, a read-only or immutable directory): the service could take no writer's lease and
        record no version; better said at start than at every push."""
        probe = directory / ".probe.tmp"  # a temp file: removed at start should it be left
        try:
            directory.mkdir(exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, bytes(PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
            raise ConfigurationError(
                f"the weights history {directory} cannot be written: {exc.strerror or exc}; "
                "free some space or make it writable"
            ) from None

    def _remove_stale_temp_files(self) -> None:
        """Remove the partial files a crash left (at start: nothing else writes here yet)."""
        for tmp in sorted(self.root.glob("*/.*.tmp")):
            tmp.unlink(missing_ok=True)
            logger.warning("removed %s, a partial write left by an earlier run", tmp)

    def save(self, model: ServedModel) -> int | None:
        """Write the model's live generation atomically; return its version, or None when a
        push started overwriting its weights before they were all copied (a newer version is
        live then: the Persister, persister.py, writes that one next). A disk error is logged
        and raised."""
        generation, count = model.snapshot()
        try:
            return self._save(model, generation, count)
        except OSError as exc:
            logger.error(
                "model %s: version %d was not written to disk: %s (versions on disk: %s)",
                model.name,
                generation.version,
                exc,
                ", ".join(str(v.version) for v in self.versions(model.name)) or "none",
            )
            raise

    def _save(self, model: ServedModel, generation: Generation, count: int) -> int | None:
        directory = self._dir(model.name)
        directory.mkdir(exist_ok=True)
        path = directory / file_name(generation.version)
        if path.exists():
            return generation.version
        try:
            written = self._write(model, generation, count, path)
        except OSError as exc:
            if exc.errno not in NO_SPACE or not self._make_room(model.name, generation.version):
                raise
            written = self._write(model, generation, count, path)
        if not written:
            logger.info(
                "model %s: version %d was not written to disk: a push reused its weights "
                "before they were copied; the newer version is written next",
                model.name,
                generation.version,
            )
            return None
        for old in self.versions(model.name)[self.history :]:
            try:
                old.path.unlink(missing_ok=True)
            except OSError as exc:  # the new version stands: only the history grows
                logger.error(
                    "model %s: version %d was written, but version %d could not be removed to "
                    "keep --history %d: %s",
                    model.name,
                    generation.version,
                    old.version,
                    self.history,
                    exc,
                )
        return generation.version

    def _make_room(self, name: str, version: int) -> bool:
        """Out of space: remove every stored version but the newest; whether any was removed."""
        stored = self.versions(name)
        if len(stored) <= 1:
            logger.error(
                "model %s: out of disk space writing version %d, and nothing to remove: the "
                "only complete version on disk (%s) is kept",
                name,
                version,
                stored[0].version if stored else "none",
            )
            return False
        older = stored[1:]
        for old in older:
            old.path.unlink(missing_ok=True)
        logger.warning(
            "model %s: out of disk space writing version %d; removed version%s %s to make "
            "room (kept version %d); trying once more",
            name,
            version,
            "s" if len(older) > 1 else "",
            ", ".join(str(v.version) for v in older),
            stored[0].version,
        )
        return True

    def _write(self, model: ServedModel, generation: Generation, count: int, path: Path) -> bool:
        """Write `generation` to `path` through a temp file; False if a push reused its module
        first. The temp file is removed unless it became `path`."""
        payload = Payload.of(
            list(generation.committed.items()),
            {
                "version": str(generation.version),
                "writer_id": generation.writer_id,
                "digest": generation.digest.hex(),
                "committed_at": repr(generation.committed_at),
            },
        )
        tmp = path.with_name(f".{path.name}.tmp")
        complete = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                complete = self._fill(fd, model, generation, count, payload)
                if complete:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if complete:
                os.replace(tmp, path)
                fsync_path(path.parent)
        finally:
            if not complete:
                tmp.unlink(missing_ok=True)
        return complete

    def _fill(
        self, fd: int, model: ServedModel, generation: Generation, count: int, payload: Payload
    ) -> bool:
        """Copy the payload chunk by chunk while no push can start on the module, and write
        each copy with no lock held; False as soon as a push has taken the module over."""
        chunks = payload.pieces(self._chunk_bytes)
        left = payload.nbytes
        while left:
            with model.unchanged(generation, count) as unchanged:
                if not unchanged:
                    return False
                chunk = b"".join(next(chunks))
            self._write_chunk(fd, chunk)
            left -= len(chunk)
        return True

    def versions(self, name: str) -> list[StoredVersion]:
        """The stored versions of `name`, newest first (unreadable files are skipped)."""
        found = []
        for path in newest_first(self._dir(name)):
            try:
                found.append(StoredVersion.from_file(path))
            except FileNotFoundError:
                continue  # pruned since the listing: older than the history kept
            except Exception as exc:  # a damaged file fails in safetensors' own ways too
                logger.warning("skipping unreadable weights file %s: %s", path, exc)
        return found

    def find(self, name: str, version: int) -> StoredVersion:
        """The stored `version` of `name`: NotFound when it is not on disk, damaged when its
        file is there but cannot be read."""
        for stored in self.versions(name):
            if stored.version == version:
                return stored
        path = self._dir(name) / file_name(version)
        if path.exists():
            try:
                StoredVersion.from_file(path)
            except Exception as exc:  # a damaged file fails in safetensors' own ways too
                raise StoredVersionDamagedError(
                    f"model {name!r}: the stored version {version} is damaged: its file {path} "
                    f"cannot be read ({exc}), so it cannot be served again; nothing was swapped"
                ) from None
        kept = ", ".join(str(v.version) for v in self.versions(name)) or "none"
        raise ModelNotFoundError(f"model {name!r} version {version} is not on disk (kept: {kept})")

    def restore(self, model: ServedModel) -> bool:
        """Load the newest stored version that fits the model and checks out, and its writer.

        Newer files that do not check out are set aside once an older one is restored (renamed
        `*.corrupt`: their version numbers are written again). When there are files and none
        checks out, ConfigurationError: serving the app's initial weights would number new
        versions as ones already served."""
        self._check_writable(self._dir(model.name))
        model.lease.attach(self._dir(model.name))  # its writer.json (ConfigurationError if bad)
        rejected: list[tuple[Path, str]] = []
        for path in newest_first(self._dir(model.name)):
            problem = self._load(model, path)
            if problem is None:
                for bad, _ in rejected:
                    self._set_aside(model.name, bad)
                logger.info(
                    "model %s: restored version %d from %s", model.name, int(path.stem), path
                )
                return True
            logger.error("model %s: %s %s; not restoring it", model.name, path, problem)
            rejected.append((path, problem))
        if rejected:
            raise ConfigurationError(
                f"model {model.name!r}: no weights file in {self._dir(model.name)} can be "
                f"restored ({'; '.join(f'{p.name} {why}' for p, why in rejected)}); starting "
                "from the app's initial weights would serve new versions under numbers already "
                "served. Restore the files from a backup, or move them away to start afresh"
            )
        return False

    @staticmethod
    def _set_aside(name: str, path: Path) -> None:
        aside = path.with_name(f"{path.name}.corrupt")
        try:
            os.replace(path, aside)
        except OSError as exc:
            logger.error("model %s: cannot set %s aside: %s", name, path, exc)
            return
        logger.warning("model %s: set %s aside as %s", name, path, aside.name)

    @staticmethod
    def _load(model: ServedModel, path: Path) -> str | None:
        """Load `path` into the model; None if it did, else what is wrong with it."""
        try:
            stored = StoredVersion.from_file(path)
            if file_name(stored.version) != path.name:
                return f"names version {stored.version} in its metadata"
            with safe_open(str(path), framework="pt") as file:
                layout = {}
                for key in file.keys():  # noqa: SIM118 - safe_open is not a mapping
                    piece = file.get_slice(key)
                    layout[key] = TensorLayout(piece.get_dtype(), tuple(piece.get_shape()))
                if layout != model.layout:
                    return f"does not match the model's tensors ({_mismatch(layout, model.layout)})"
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        except Exception as exc:  # a damaged file fails in safetensors' own ways too
            return f"cannot be read ({exc})"
        hashes = tensor_hashes(tensors)
        if model.digest_of(hashes) != stored.digest:
            return "fails its digest check"
        model.restore(tensors, stored.version, stored.writer_id, hashes, stored.committed_at)
        return None


def _mismatch(stored: Mapping[str, TensorLayout], model: Mapping[str, TensorLayout]) -> str:
    """The first tensor that differs between a stored file's layout and the model's."""
    for name in sorted(stored.keys() | model.keys()):
        have, want = stored.get(name), model.get(name)
        if have is None:
            return f"tensor {name!r} is not in the file"
        if want is None:
            return f"tensor {name!r} is not in the model"
        if have != want:
            return (
                f"tensor {name!r} is {have.dtype}{list(have.shape)} in the file but "
                f"{want.dtype}{list(want.shape)} in the model"
            )
    return "no tensor differs"
