"""What the writers were told, and what the service may therefore serve.

Every push attempt is recorded with the state it would make live and how it ended: answered OK,
refused (an error the service answered), never committed (cut before its commit was sent), or in
doubt (the commit was sent and the answer never arrived: it may or may not have committed).
Every AcquireWriter answered OK is a grant (holder, epoch, the version served then). Trainer
processes are writers too: a trainer's n-th run pushes every tensor filled with n, so what it
may have committed is any uniform state, and its log says which versions it was answered OK.

The invariants (checked by the harness at every quiet point):
- the served state, and every version file on disk, is a state some push that was not refused
  or cut would make live (or the initial zeros of version 0);
- no version was committed by a writer after a grant to another writer fenced it;
- the served version is at least the floor: the newest version answered OK since the service
  last started, and after a restart the newest version that was on disk when it went down (all
  that README's "written to disk in the background" promises across a kill -9), or after a
  SIGTERM every version answered OK (the drain writes the newest; unless the disk was full since);
- the lease on disk and the one GetModel reports are the last grant answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.faults import stamp

OK = "answered OK"
REFUSED = "refused"
UNSENT = "cut before its commit was sent"
IN_DOUBT = "in doubt (commit sent, no answer)"
MAY_BE_SERVED = (OK, IN_DOUBT)


@dataclass
class Attempt:
    step: int
    writer: str
    epoch: int
    version: int
    fills: stamp.Fills
    outcome: str = UNSENT
    detail: str = ""
    lease_at_commit: tuple[int, str] | None = None  # the last grant when the commit was sent

    @property
    def digest(self) -> bytes:
        return stamp.digest(self.fills)

    def describe(self) -> str:
        return (
            f"step {self.step} push by {self.writer} epoch {self.epoch} version {self.version} "
            f"fills={list(self.fills)}: {self.outcome}{': ' + self.detail if self.detail else ''}"
        )


@dataclass(frozen=True)
class Grant:
    step: int
    holder: str
    epoch: int
    version: int  # served when granted (for a trainer: an upper bound, read just after)


@dataclass
class Ledger:
    attempts: list[Attempt] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)
    trainers: set[str] = field(default_factory=set)  # trainer ids ever started
    acked: int = 0  # newest version answered OK since the service last started
    start_floor: int = 0  # what the service had to come back with at its last start
    seen: int = 0  # newest version seen served since the service last started
    unpersistable: bool = False  # the disk was full since the newest version answered OK
    disk_full: bool = False

    # -- recording -----------------------------------------------------------------------------

    def attempt(
        self, step: int, writer: str, epoch: int, version: int, fills: stamp.Fills
    ) -> Attempt:
        made = Attempt(step, writer, epoch, version, fills)
        self.attempts.append(made)
        return made

    def grant(self, step: int, holder: str, epoch: int, version: int) -> None:
        self.grants.append(Grant(step, holder, epoch, version))

    def ack(self, version: int) -> None:
        """A version answered OK to its writer (a raw writer, or a trainer by its log)."""
        self.acked = max(self.acked, version)
        self.unpersistable = self.disk_full

    def lease(self) -> tuple[int, str]:
        """The last grant answered: (epoch, holder); (0, "") before any."""
        if not self.grants:
            return 0, ""
        last = self.grants[-1]
        return last.epoch, last.holder

    def floor(self) -> int:
        return max(self.start_floor, self.acked)

    def restarted(self, on_disk: int, graceful: bool) -> None:
        """The service went down with `on_disk` its newest whole version file; it starts again."""
        kept = self.acked if graceful and not self.unpersistable else 0
        self.start_floor = max(on_disk, kept)
        self.acked = 0
        self.seen = 0

    # -- what may be served --------------------------------------------------------------------

    def fills_of(self, digest: bytes) -> stamp.Fills | None:
        """The state with this digest, if any writer ever pushed it (for building deltas)."""
        for made in reversed(self.attempts):
            if made.digest == digest:
                return made.fills
        for value in range(stamp.MAX_FILL + 1):
            if stamp.digest(stamp.uniform(value)) == digest:
                return stamp.uniform(value)
        return None

    def unknown_state(self, version: int, digest: bytes, writer: str) -> str | None:
        """Why (version, digest, writer) is no state the service may serve; None if it may."""
        if version == 0 and writer == "" and digest == stamp.digest(stamp.ZEROS):
            return None
        if writer in self.trainers:
            if any(digest == stamp.digest(stamp.uniform(v)) for v in range(stamp.MAX_FILL + 1)):
                return None
            return f"version {version} by trainer {writer!r} is no state a trainer pushes"
        matches = [
            a for a in self.attempts if (a.version, a.digest, a.writer) == (version, digest, writer)
        ]
        if any(a.outcome in MAY_BE_SERVED for a in matches):
            return None
        if matches:
            return "it is the push of " + "; ".join(a.describe() for a in matches)
        return f"no push of version {version} by {writer!r} had digest {digest.hex()}"

    def unknown_output(self, version: int, fills: stamp.Fills) -> str | None:
        """Why the data plane's answer (version, per-tensor means) is no state of that version."""
        if version == 0 and fills == stamp.ZEROS:
            return None
        if self.trainers and len(set(fills)) == 1 and 0 <= fills[0] <= stamp.MAX_FILL:
            return None
        same = [a for a in self.attempts if a.version == version and a.fills == fills]
        if any(a.outcome in MAY_BE_SERVED for a in same):
            return None
        if same:
            return "it is the push of " + "; ".join(a.describe() for a in same)
        return f"no push of version {version} makes these weights"

    def fenced_commit(self, version: int, writer: str) -> str | None:
        """Why `writer` committing `version` breaks fencing (a later grant to another writer,
        answered while an older version was served); None if it does not."""
        own = [i for i, g in enumerate(self.grants) if g.holder == writer]
        after = own[-1] + 1 if own else 0
        for grant in self.grants[after:]:
            if grant.holder != writer and version > grant.version:
                return (
                    f"version {version} was committed by {writer!r} after the grant at step "
                    f"{grant.step} to {grant.holder!r} (epoch {grant.epoch}, version "
                    f"{grant.version} served then) fenced it"
                )
        return None
