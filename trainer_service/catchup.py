"""The background catch-up: brings inference services that missed versions up to the newest.

A thread wakes when a target is due (each lagging target carries its own retry time, growing
with capped backoff, see targets.Target.fall_behind) and hands it to a small pool that tries it
once (`CatchUp._catch_up_one`): from another target that holds the newest version (a Seed: the
trainer's link carries nothing), else pushed from the host copy the publisher keeps while a
target lags (published.py). A target is handled by one catch-up at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from shared import protocol
from trainer_service.delivery import Delivery, Version
from trainer_service.published import NUMBERING_CEILING, Published, too_high
from trainer_service.push import UNREACHABLE, PushFailedError
from trainer_service.targets import Snapshot, Target

CATCH_UP_WAIT_S = 30.0  # the longest a catch-up waits for a sync of its model in flight

logger = logging.getLogger(__name__)


class CatchUp:
    def __init__(
        self,
        published: Published,
        delivery: Delivery,
        from_peers: bool = True,
        workers: int = 4,
    ) -> None:
        self._published = published
        self._delivery = delivery
        self._from_peers = from_peers
        self._donor_turns: dict[str, int] = {}  # per model: the next donor, round-robin
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
            targets = self._published.lagging()  # outside the condition: it takes the lock
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
            self._catch_up_one(target)
        except Exception as error:
            # Stopping, or forgetting a target no longer named, closes the channels under
            # running catch-ups: those fail as expected.
            if not self._stopping and not target.forgotten:
                logger.exception("model %s: catching %s up failed", target.model, target.address)
                target.fall_behind(repr(error))
        finally:
            with self._wake:
                target.catching_up = False
                self._woken = True
                self._wake.notify()

    def _catch_up_one(self, target: Target) -> None:
        """Bring one lagging target up to the newest version, from another target that holds
        it (a Seed) where one can, else directly; or put it off again. A sync of the model in
        flight is waited for first (up to CATCH_UP_WAIT_S): its version is the one to bring the
        target to, and the targets it reaches can seed it, where starting now would bring the
        target to the version before it and then again to that one."""
        published = self._published
        published.wait_for_syncs(target.model, CATCH_UP_WAIT_S)
        with target.lock:
            with published.lock:
                if not target.lagging:
                    return
                snapshot = published.snapshots.get(target.model)
                donor = self._donor(target, snapshot)
            try:
                # Its answer serves the seed or push that follows under the same hold of the
                # lock; a push after a seed that did not take asks again (the seed may have
                # changed what it holds).
                remote = target.contact(self._delivery.connect_timeout_s)
                if not published.targets.distinct(target):
                    return  # another target feeds its service
                if remote.version >= NUMBERING_CEILING:
                    target.fall_behind(too_high(target.address, remote.version))
                    return
                if snapshot is not None and remote.version > snapshot.version:
                    # It serves a version newer than any this trainer has: one a trainer before
                    # it pushed (this one restarted from an older checkpoint while the target
                    # was away). Nothing numbered below that is taken: the next sync is
                    # numbered above it, and brings it up to date.
                    published.numbered_above(target.model, remote.version)
                    target.left_to_next_sync(
                        f"it serves version {remote.version}, newer than this trainer's newest "
                        f"({snapshot.version}): the next sync is numbered above it, and feeds it"
                    )
                    return
                if snapshot is None or target.version >= snapshot.version:
                    donor = None
                else:
                    version = Version(snapshot.version, snapshot.tensors, snapshot.hashes)
                    if donor is None or not self._delivery.seed(target, donor, version, remote):
                        self._delivery.push(
                            target, version, remote=None if donor is not None else remote
                        )
                        donor = None
            except PushFailedError as error:
                if error.reason == protocol.FENCED:
                    published.fence(target.model, error)
                if error.code not in UNREACHABLE:
                    logger.error(
                        "model %s: catching %s up failed: %s", target.model, target.address, error
                    )
                target.fall_behind(error)
                return
            with published.lock:
                if (
                    snapshot is not None
                    and published.versions.get(target.model) != snapshot.version
                ):
                    target.retry_at = 0.0  # a newer version came meanwhile: again, now
                    return
                target.caught_up(None if donor is None else donor.address)
                if not any(t.lagging for t in published.targets.known(target.model)):
                    published.snapshots.pop(target.model, None)

    def _donor(self, target: Target, snapshot: Snapshot | None) -> Target | None:
        """Another target that acknowledged the snapshot's version and is not lagging, to
        catch `target` up from (round-robin among them); None: push it directly. Called under
        the published state's lock."""
        if not self._from_peers or snapshot is None or snapshot.hashes is None:
            return None
        holders = sorted(
            (
                t
                for t in self._published.targets.known(target.model)
                if t is not target
                and not t.lagging
                and t.version == snapshot.version
                and t.hashes == snapshot.hashes
            ),
            key=lambda t: t.address,
        )
        if not holders:
            return None
        turn = self._donor_turns.get(target.model, 0)
        self._donor_turns[target.model] = turn + 1
        return holders[turn % len(holders)]
