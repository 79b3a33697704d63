"""The steps a fault schedule is made of: what each does, and how it reads in a report.

`tests/faults/schedule.py` chooses them (seeded); `tests/faults/harness.py` carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.faults.stamp import Fills

# Where a push is cut. "after-commit": the commit is sent and the call cancelled at once, before
# its answer is read, so whether it committed is not known to the writer.
CUTS = ("after-header", "mid-payload", "before-commit", "after-commit")
# How: RST_STREAM (the call cancelled), the connection dropped (the channel closed), or the
# stream half-closed early (the client says it is done without sending the rest).
HOWS = ("cancel", "disconnect", "half-close")
STALL_ENDS = ("commit", "cancel", "half-close", "hold")


def writer_id(index: int) -> str:
    return f"raw-{index}"


def trainer_id(index: int) -> str:
    return f"trainer-{index}"


@dataclass(frozen=True)
class Push:
    """Writer `writer` pushes version served+`ahead` (0: a stale version, refused) in full, or a
    delta changing `delta_parts` of the served weights to their value in `fills`; cut at `cut`
    (None: not cut) by `how`. `forged`: it carries an epoch above any granted (by that much)."""

    writer: int
    fills: Fills
    delta_parts: tuple[int, ...] = ()
    ahead: int = 1
    cut: str | None = None
    how: str = "cancel"
    forged: int = 0

    def describe(self) -> str:
        kind = f"delta{list(self.delta_parts)}" if self.delta_parts else "full"
        text = f"push {writer_id(self.writer)} {kind} fills={list(self.fills)} ahead={self.ahead}"
        if self.forged:
            text += f" forged-epoch=+{self.forged}"
        if self.cut:
            text += f" cut={self.cut}/{self.how}"
        return text


@dataclass(frozen=True)
class Acquire:
    writer: int

    def describe(self) -> str:
        return f"acquire {writer_id(self.writer)}"


@dataclass(frozen=True)
class AcquireRace:
    """These writers call AcquireWriter at once, `rounds` times over."""

    writers: tuple[int, ...]
    rounds: int

    def describe(self) -> str:
        return f"acquire-race {[writer_id(w) for w in self.writers]} x{self.rounds}"


@dataclass(frozen=True)
class Concurrent:
    """These pushes stream at the same time."""

    pushes: tuple[Push, ...]

    def describe(self) -> str:
        return "concurrent [" + "; ".join(p.describe() for p in self.pushes) + "]"


@dataclass(frozen=True)
class Burst:
    """One writer pushes these back to back (full, then deltas of one part each)."""

    writer: int
    fills: tuple[Fills, ...]

    def describe(self) -> str:
        return f"burst {writer_id(self.writer)} x{len(self.fills)}"


@dataclass(frozen=True)
class Stall:
    """A push stops at `stage` for `seconds` while `during` runs, then ends by `end`.

    `during` items: ("acquire", writer) and ("push", writer) (a full push of `other_fills`).
    "hold": the writer sends nothing more and keeps the stream open; the service must end it.
    `acquire_first`: the writer calls AcquireWriter just before, so it is the current writer
    when its push starts (and an acquire during the stall fences it mid-stream)."""

    writer: int
    fills: Fills
    stage: str
    seconds: float
    during: tuple[tuple[str, int], ...]
    end: str
    other_fills: Fills = field(default=())
    acquire_first: bool = False

    def describe(self) -> str:
        during = ", ".join(f"{what} {writer_id(w)}" for what, w in self.during) or "nothing"
        first = " (acquires first)" if self.acquire_first else ""
        return (
            f"stall {writer_id(self.writer)}{first} fills={list(self.fills)} at {self.stage} for "
            f"{self.seconds:.1f}s during [{during}] then {self.end}"
        )


@dataclass(frozen=True)
class KillService:
    """Stop the inference service (kill -9, or SIGTERM when `graceful`), optionally in the middle
    of `mid_push` (sent up to its cut point), and start it again on the same state dir."""

    graceful: bool
    mid_push: Push | None = None

    def describe(self) -> str:
        how = "SIGTERM" if self.graceful else "kill -9"
        during = f" during [{self.mid_push.describe()}]" if self.mid_push else ""
        return f"restart-service ({how}){during}"


@dataclass(frozen=True)
class KillRelay:
    mid_push: Push | None = None

    def describe(self) -> str:
        during = f" during [{self.mid_push.describe()}]" if self.mid_push else ""
        return f"kill -9 relay{during}"


@dataclass(frozen=True)
class StartTrainer:
    trainer: int

    def describe(self) -> str:
        return f"start {trainer_id(self.trainer)}"


@dataclass(frozen=True)
class AwaitTrainer:
    """Let the trainer commit `commits` more versions (unless it stops first)."""

    trainer: int
    commits: int

    def describe(self) -> str:
        return f"await {trainer_id(self.trainer)} commits={self.commits}"


@dataclass(frozen=True)
class KillTrainer:
    trainer: int

    def describe(self) -> str:
        return f"kill -9 {trainer_id(self.trainer)}"


@dataclass(frozen=True)
class FillDisk:
    def describe(self) -> str:
        return "fill-disk"


@dataclass(frozen=True)
class FreeDisk:
    def describe(self) -> str:
        return "free-disk"


Step = (
    Push
    | Acquire
    | AcquireRace
    | Concurrent
    | Burst
    | Stall
    | KillService
    | KillRelay
    | StartTrainer
    | AwaitTrainer
    | KillTrainer
    | FillDisk
    | FreeDisk
)
