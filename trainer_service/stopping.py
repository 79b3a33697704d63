"""How long a stopping trainer lets its pushes run.

On SIGTERM the trainer finishes the run in progress, syncs it and checkpoints. A push to a
slow but live replica could hold that sync to the push deadline (600 s by default), far past
what an orchestrator waits before it kills the process (docker compose: 10 s unless told
otherwise), and the checkpoint would never be written. Once stopping, pushes get
`--stop-sync-timeout-s` more; then they are cancelled, and their services lag: they keep the
version they serve and are caught up at the trainer's next start.
"""

from __future__ import annotations

import threading
import time


class Stopping:
    """Whether pushes are to be cut: `bound_s` seconds after `stop` was set."""

    def __init__(self, stop: threading.Event, bound_s: float) -> None:
        self.bound_s = bound_s
        self._stop = stop
        self._since: float | None = None
        threading.Thread(target=self._note, name="stopping", daemon=True).start()

    def cut(self) -> bool:
        since = self._since
        return since is not None and time.monotonic() - since >= self.bound_s

    def _note(self) -> None:
        self._stop.wait()
        self._since = time.monotonic()
