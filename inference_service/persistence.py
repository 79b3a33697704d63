"""Keep each model's recent committed versions on disk; serve the newest again after a restart.

After every commit a background thread writes the live generation to
`<state-dir>/models/<model>/<version>.safetensors` (temp file, fsync, rename, fsync of the
directory), with its version, writer, digest and commit time in the safetensors metadata, and
keeps the newest `history` files. Commits that land while a write runs are coalesced: the newest
version is written next. At start, the newest file whose tensors match the model and whose digest
checks out is loaded, with its version, before the service reports ready. The files are the
history an operator lists and rolls back to.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from inference_service.served_model import ServedModel
from shared.errors import ModelNotFoundError
from shared.weights.digest import tensor_hash
from shared.weights.layout import TensorLayout
from shared.weights.writer import Payload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredVersion:
    version: int
    writer_id: str
    digest: bytes
    committed_at: float
    path: Path

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def chunks(self, size: int = 4 << 20) -> Iterator[bytes]:
        with self.path.open("rb") as file:
            while chunk := file.read(size):
                yield chunk


class WeightStore:
    def __init__(self, root: Path, history: int = 5) -> None:
        self.root = root
        self.history = max(1, history)
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        return self.root / name

    def save(self, model: ServedModel) -> int:
        """Write the model's live generation atomically; return the version written."""
        with model.acquire() as generation:
            directory = self._dir(model.name)
            directory.mkdir(exist_ok=True)
            path = directory / f"{generation.version:012d}.safetensors"
            if path.exists():
                return generation.version
            payload = Payload.of(
                list(generation.module.state_dict().items()),
                {
                    "version": str(generation.version),
                    "writer_id": generation.writer_id,
                    "digest": generation.digest.hex(),
                    "committed_at": repr(generation.committed_at),
                },
            )
            tmp = directory / f".{path.name}.tmp"
            with tmp.open("wb") as out:
                for chunk in payload.chunks(8 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            _fsync_dir(directory)
        for old in self.versions(model.name)[self.history :]:
            old.path.unlink(missing_ok=True)
        return generation.version

    def save_lease(self, name: str, epoch: int, holder: str) -> None:
        """Record the model's writer, so a restart keeps fencing the writers before it."""
        directory = self._dir(name)
        directory.mkdir(exist_ok=True)
        path = directory / "writer.json"
        tmp = directory / ".writer.json.tmp"
        with tmp.open("w") as out:
            json.dump({"epoch": epoch, "holder": holder}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)

    def restore_lease(self, model: ServedModel) -> None:
        path = self._dir(model.name) / "writer.json"
        try:
            lease = json.loads(path.read_text())
            model.adopt_epoch(int(lease["epoch"]), str(lease["holder"]))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("model %s: ignoring unreadable %s: %s", model.name, path, exc)

    def versions(self, name: str) -> list[StoredVersion]:
        """The stored versions of `name`, newest first (unreadable files are skipped)."""
        found = []
        for path in sorted(self._dir(name).glob("*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), framework="pt") as stored:
                    meta = stored.metadata() or {}
                found.append(
                    StoredVersion(
                        int(meta["version"]),
                        meta.get("writer_id", ""),
                        bytes.fromhex(meta["digest"]),
                        float(meta.get("committed_at", "0")),
                        path,
                    )
                )
            except (OSError, KeyError, ValueError, Exception) as exc:
                logger.warning("skipping unreadable weights file %s: %s", path, exc)
        return found

    def find(self, name: str, version: int) -> StoredVersion:
        for stored in self.versions(name):
            if stored.version == version:
                return stored
        kept = ", ".join(str(v.version) for v in self.versions(name)) or "none"
        raise ModelNotFoundError(f"model {name!r} version {version} is not on disk (kept: {kept})")

    def restore(self, model: ServedModel) -> bool:
        """Load the newest stored version that fits the model and checks out, and its writer."""
        self.restore_lease(model)
        for stored in self.versions(model.name):
            if self._load(model, stored):
                logger.info(
                    "model %s: restored version %d from %s", model.name, stored.version, stored.path
                )
                return True
        return False

    @staticmethod
    def _load(model: ServedModel, stored: StoredVersion) -> bool:
        with safe_open(str(stored.path), framework="pt") as file:
            layout = {}
            for key in file.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = file.get_slice(key)
                layout[key] = TensorLayout(piece.get_dtype(), tuple(piece.get_shape()))
            if layout != model.layout:
                logger.warning(
                    "model %s: %s does not match the model's tensors; ignoring it",
                    model.name,
                    stored.path,
                )
                return False
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        hashes = {k: tensor_hash(t) for k, t in tensors.items()}
        if model.digest_of(hashes) != stored.digest:
            logger.warning(
                "model %s: %s fails its digest check; ignoring it", model.name, stored.path
            )
            return False
        model.restore(tensors, stored.version, stored.writer_id, hashes, stored.committed_at)
        return True


def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class Persister:
    """Writes committed generations in the background, newest only."""

    def __init__(self, store: WeightStore, models: Mapping[str, ServedModel]) -> None:
        self._store = store
        self._models = models
        self._dirty: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="persister", daemon=True)
        self._thread.start()

    def committed(self, name: str) -> None:
        with self._cond:
            self._dirty.add(name)
            self._cond.notify()

    def close(self) -> None:
        """Write what is pending, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopping)
                if not self._dirty:
                    return
                name = self._dirty.pop()
            try:
                version = self._store.save(self._models[name])
                logger.debug("model %s: version %d written to disk", name, version)
            except OSError:
                logger.exception("model %s: could not write its weights to disk", name)
