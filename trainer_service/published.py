"""What a publisher has published, as its syncs and its background catch-up both see it: the
targets, per model the newest version and (while some target lags) the host copy of it, the
syncs in flight, and whether another trainer has fenced this one off."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from trainer_service.targets import Snapshot, Target, Targets

# A push's version is below 2^63 (the services refuse any other). A trainer numbers no version
# within 2^40 of that end: a service serving one so high (pushed by a bug, or by hand with the
# sync token) is left out of the numbering, lagging, rather than running every service out of
# versions (2^40 syncs are 35 years at a thousand a second).
NUMBERING_CEILING = (1 << 63) - (1 << 40)


def too_high(address: str, version: int) -> str:
    """Why a service serving `version` (at or past NUMBERING_CEILING) is left out."""
    return (
        f"it serves version {version}, within 2^40 of the last version a push may carry "
        f"(2^63 - 1): numbering above it would run every service out of versions, so it is "
        f"left out until it serves a lower one (remove the model's state on {address}, or "
        "take it out of --inference)"
    )


class Published:
    """The state shared by the publisher's syncs (publisher.py) and its catch-up (catchup.py).

    `lock` guards the targets' lagging state as the sync and the catch-up see it, `versions`
    and `snapshots`; it is never held while waiting for a target's lock."""

    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        self.lock = threading.Lock()
        self.versions: dict[str, int] = {}  # per model, the last version pushed
        self.snapshots: dict[str, Snapshot] = {}  # per model, while a target lags
        # Why this publisher may push no more: another trainer took one of its models over.
        self.fenced: str | None = None
        # Per model, the syncs in flight; notified as each ends (a catch-up waits for them).
        self._syncing: Counter[str] = Counter()
        self._synced = threading.Condition()

    @contextmanager
    def syncing(self, model: str) -> Iterator[None]:
        """Count a sync of `model` in flight while the block runs."""
        with self._synced:
            self._syncing[model] += 1
        try:
            yield
        finally:
            with self._synced:
                self._syncing[model] -= 1
                self._synced.notify_all()

    def wait_for_syncs(self, model: str, timeout_s: float) -> None:
        """Wait until no sync of `model` is in flight, up to `timeout_s`."""
        with self._synced:
            self._synced.wait_for(lambda: not self._syncing[model], timeout=timeout_s)

    def fence(self, model: str, why: object) -> str:
        """Record that another trainer has taken `model` over (`why`: its refusals); the
        message every later sync fails with."""
        self.fenced = f"model {model!r}: another trainer has taken it over: {why}"
        return self.fenced

    def numbered_above(self, model: str, version: int) -> int:
        """Record that a target serves `version` of `model`: the next version pushed is
        numbered above it (a target refuses a version not newer than its own). Returns the
        number the newest version now counts as. (Its callers leave out a target serving a
        version at or past NUMBERING_CEILING before they get here.)"""
        with self.lock:
            newest = max(self.versions.get(model, 0), version)
            self.versions[model] = newest
        return newest

    def lagging(self) -> list[Target]:
        with self.lock:
            return [t for t in self.targets.known() if t.lagging]
