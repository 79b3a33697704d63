"""Keep each model's last committed weights on disk and serve them again after a restart.

After every commit a background thread writes the live generation to
`<state-dir>/<model>.safetensors` (temp file, fsync, rename, fsync of the directory), with its
version, writer and digest in the safetensors metadata. Commits that land while a write is running
are coalesced: only the newest version is written next. At start, a file whose tensors match the
model and whose digest checks out is loaded before the service reports ready, with its version.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open

from inference_service.served_model import ServedModel
from shared.weights.digest import tensor_hash
from shared.weights.layout import TensorLayout
from shared.weights.writer import Payload

logger = logging.getLogger(__name__)


class WeightStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def save(self, model: ServedModel) -> int:
        """Write the model's live generation atomically; return the version written."""
        with model.acquire() as generation:
            payload = Payload.of(
                list(generation.module.state_dict().items()),
                {
                    "version": str(generation.version),
                    "writer_id": generation.writer_id,
                    "digest": generation.digest.hex(),
                },
            )
            path = self.path(model.name)
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("wb") as out:
                for chunk in payload.chunks(8 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            directory = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            return generation.version

    def restore(self, model: ServedModel) -> bool:
        """Load the stored weights into the model if they fit it and check out."""
        path = self.path(model.name)
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            layout = {}
            for key in stored.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = stored.get_slice(key)
                layout[key] = TensorLayout(piece.get_dtype(), tuple(piece.get_shape()))
            if layout != model.layout:
                logger.warning(
                    "model %s: %s does not match the model's tensors; ignoring it", model.name, path
                )
                return False
            tensors = {k: stored.get_tensor(k) for k in stored.keys()}  # noqa: SIM118
        hashes = {k: tensor_hash(t) for k, t in tensors.items()}
        if model.digest_of(hashes).hex() != metadata.get("digest"):
            logger.warning("model %s: %s fails its digest check; ignoring it", model.name, path)
            return False
        model.restore(tensors, int(metadata["version"]), metadata.get("writer_id", ""), hashes)
        logger.info("model %s: restored version %s from %s", model.name, metadata["version"], path)
        return True


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
