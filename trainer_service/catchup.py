"""The background catch-up: brings inference services that missed versions up to the newest.

A thread wakes when a target is due (each lagging target carries its own retry time, growing
with capped backoff, see targets.Target.fall_behind) and hands it to a small pool that tries it
once; the publisher says how (`catch_up`). A target is handled by one catch-up at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from trainer_service.targets import Target

logger = logging.getLogger(__name__)


class CatchUp:
    def __init__(
        self,
        lagging: Callable[[], Sequence[Target]],
        catch_up: Callable[[Target], None],
        workers: int = 4,
    ) -> None:
        self._lagging = lagging
        self._catch_up = catch_up
        self._wake = threading.Condition()
        self._woken = False
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="catch-up")
        self._thread = threading.Thread(target=self._run, name="catch-up", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the lagging targets again now (one was added, or one got a newer version)."""
        with self._wake:
            self._woken = True
            self._wake.notify()

    def stop(self) -> None:
        """Schedule no more catch-ups; `join` waits for the ones running."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def join(self) -> None:
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            targets = self._lagging()  # outside the condition: it takes the publisher's lock
            now = time.monotonic()
            next_at: float | None = None
            with self._wake:
                if self._stopping:
                    return
                for target in targets:
                    if target.catching_up:
                        continue
                    if target.retry_at <= now:
                        target.catching_up = True
                        self._pool.submit(self._task, target)
                    else:
                        next_at = (
                            target.retry_at if next_at is None else min(next_at, target.retry_at)
                        )
                if not self._woken:
                    self._wake.wait(None if next_at is None else max(next_at - now, 0.0))
                self._woken = False

    def _task(self, target: Target) -> None:
        try:
            self._catch_up(target)
        except Exception as error:
            if not self._stopping:  # stopping closes the channels under running catch-ups
                logger.exception("model %s: catching %s up failed", target.model, target.address)
                target.fall_behind(repr(error))
        finally:
            with self._wake:
                target.catching_up = False
                self._woken = True
                self._wake.notify()
