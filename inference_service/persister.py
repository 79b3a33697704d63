"""The background writer of the weights history: each committed version of a model is written
to disk (persistence.WeightStore) after its commit, off the push's path, newest only."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from inference_service.persistence import WeightStore
from inference_service.served_model import ServedModel

logger = logging.getLogger(__name__)

# How long a stopping service waits for the history's last writes (a disk that hangs must not
# hold the process: what is not written then is as after a kill -9, the version before served).
WRITE_WAIT_S = 10.0


class Persister:
    """Writes committed generations in the background, newest only."""

    def __init__(self, store: WeightStore, models: Mapping[str, ServedModel]) -> None:
        self._store = store
        self._models = models
        self._dirty: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._writing: str | None = None
        self._thread = threading.Thread(target=self._run, name="persister", daemon=True)
        self._thread.start()

    def committed(self, name: str) -> None:
        with self._cond:
            self._dirty.add(name)
            self._cond.notify()

    def close(self, timeout_s: float = WRITE_WAIT_S) -> None:
        """Write what is pending, then stop; after `timeout_s`, stop without it (logged)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            left = sorted(self._dirty | ({self._writing} if self._writing else set()))
        if self._thread.is_alive() and left:
            logger.warning(
                "model(s) %s: the newest version was not yet on disk %gs after the drain; "
                "stopping without it (a restart serves the version before)",
                ", ".join(left),
                timeout_s,
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopping)
                if not self._dirty:
                    return
                name = self._writing = self._dirty.pop()
            try:
                version = self._store.save(self._models[name])
            except OSError:
                continue  # logged by the store; the next commit tries again
            finally:
                with self._cond:
                    self._writing = None
            if version is not None:
                logger.debug("model %s: version %d written to disk", name, version)
