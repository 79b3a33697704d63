"""Seeded, bounded schedules of faults: which steps run, in which order, with which weights.

A schedule is a pure function of its seed (and length): `generate(seed)` always gives the same
steps, so `python -m tests.faults --seed N` replays one. What the service answers may differ from
run to run (timing), and the invariants must hold whatever it answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tests.faults.stamp import MAX_FILL, PARTS, Fills
from tests.faults.steps import (
    CUTS,
    HOWS,
    STALL_ENDS,
    Acquire,
    AcquireRace,
    AwaitTrainer,
    Burst,
    Concurrent,
    FillDisk,
    FreeDisk,
    KillRelay,
    KillService,
    KillTrainer,
    Push,
    Stall,
    StartTrainer,
    Step,
)

WRITERS = 3  # raw writers raw-0 .. raw-2
TRAINERS = 2  # trainer processes trainer-0, trainer-1


def _fills(rng: random.Random) -> Fills:
    while True:
        fills = tuple(rng.randint(0, MAX_FILL) for _ in range(PARTS))
        if len(set(fills)) > 1:  # never uniform: those are what trainers push
            return fills


@dataclass(frozen=True)
class Schedule:
    seed: int
    relay: bool
    steps: tuple[Step, ...]

    def describe(self) -> str:
        lines = [f"schedule seed={self.seed} relay={'on' if self.relay else 'off'}"]
        lines += [f"  step {i}: {step.describe()}" for i, step in enumerate(self.steps)]
        return "\n".join(lines)


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.relay = self.rng.random() < 0.6
        self.full = False  # the disk is full
        self.trainers: set[int] = set()  # started and not killed (they may have stopped)
        self.holder: int | None = None  # the raw writer granted last, as far as the schedule knows

    def writer(self) -> int:
        """Mostly the writer that acquired last (whose pushes should commit), else any."""
        if self.holder is not None and self.rng.random() < 0.75:
            return self.holder
        return self.rng.randrange(WRITERS)

    def push(self, *, allow_cut: bool = True, writer: int | None = None) -> Push:
        rng = self.rng
        cut = rng.choice(CUTS) if allow_cut and rng.random() < 0.35 else None
        how = rng.choice(HOWS) if cut else "cancel"
        if cut == "after-commit" and how == "half-close":
            how = "cancel"
        delta: tuple[int, ...] = ()
        if rng.random() < 0.4:
            delta = tuple(sorted(rng.sample(range(PARTS), rng.randint(1, 3))))
        ahead = 0 if rng.random() < 0.1 else rng.choice((1, 1, 1, 2, 3))
        forged = rng.randint(1, 3) if rng.random() < 0.08 else 0
        return Push(
            self.writer() if writer is None else writer,
            _fills(rng),
            delta,
            ahead,
            cut,
            how,
            forged,
        )

    def mid_push(self) -> Push | None:
        if self.rng.random() < 0.5:
            return None
        push = self.push(allow_cut=False)
        # Sent up to the cut point, then the process is killed under it ("kill").
        return Push(push.writer, push.fills, push.delta_parts, 1, self.rng.choice(CUTS), "kill")

    def kill_service(self) -> KillService:
        if self.rng.random() < 0.3:
            return KillService(graceful=True)
        return KillService(graceful=False, mid_push=self.mid_push())

    def stall(self) -> Stall:
        rng = self.rng
        writer = self.writer()
        others = [w for w in range(WRITERS) if w != writer]
        during: list[tuple[str, int]] = []
        for _ in range(rng.randint(0, 2)):
            during.append((rng.choice(("acquire", "push")), rng.choice(others)))
        end = rng.choices(STALL_ENDS, weights=(4, 2, 1, 2))[0]
        first = writer != self.holder or rng.random() < 0.3
        return Stall(
            writer,
            _fills(rng),
            rng.choice(("after-header", "mid-payload")),
            round(rng.uniform(0.2, 1.5), 1),
            tuple(during),
            end,
            _fills(rng),
            first,
        )

    def step(self) -> Step:
        rng = self.rng
        choices: list[tuple[float, Callable[[], Step]]] = [
            (5, lambda: self.push()),
            (3, lambda: Acquire(rng.randrange(WRITERS))),
            (2, self.stall),
            (1, lambda: AcquireRace(tuple(rng.sample(range(WRITERS), 3)), rng.randint(2, 5))),
            (
                1,
                lambda: Concurrent(
                    tuple(
                        self.push(allow_cut=False, writer=w) for w in rng.sample(range(WRITERS), 2)
                    )
                ),
            ),
            (0.7, lambda: Burst(self.writer(), tuple(_fills(rng) for _ in range(3)))),
        ]
        idle = [t for t in range(TRAINERS) if t not in self.trainers]
        if idle and not self.full:  # (on a full disk its AcquireWriter waits for space)
            choices.append((1.2, lambda: StartTrainer(rng.choice(idle))))
        if not self.full:
            choices.append((1.5, lambda: self.kill_service()))
            choices.append((1, FillDisk))
        else:
            choices.append((2, FreeDisk))
        if self.relay:
            choices.append((1, lambda: KillRelay(self.mid_push())))
        if self.trainers:
            trainer = rng.choice(sorted(self.trainers))
            choices.append((1, lambda: AwaitTrainer(trainer, rng.randint(1, 3))))
            choices.append((1, lambda: KillTrainer(trainer)))
        weights = [w for w, _ in choices]
        step = rng.choices([make for _, make in choices], weights=weights)[0]()
        if isinstance(step, Acquire):
            self.holder = step.writer
        elif isinstance(step, Stall):
            acquired = [w for what, w in step.during if what == "acquire"]
            first = [step.writer] if step.acquire_first else []
            self.holder = ([self.holder, *first, *acquired])[-1]
        elif isinstance(step, (AcquireRace, StartTrainer)):
            self.holder = None
        elif isinstance(step, FillDisk):
            self.full = True
        elif isinstance(step, FreeDisk):
            self.full = False
        elif isinstance(step, StartTrainer):
            self.trainers.add(step.trainer)
        elif isinstance(step, KillTrainer):
            self.trainers.discard(step.trainer)
        return step


def generate(seed: int, length: int = 12) -> Schedule:
    """The schedule of `seed`: `length` steps, then the disk freed if it was left full."""
    made = _Generator(seed)
    steps = [made.step() for _ in range(length)]
    if made.full:
        steps.append(FreeDisk())
    return Schedule(seed, made.relay, tuple(steps))


def features(schedule: Schedule) -> set[str]:
    """The kinds of fault a schedule exercises (to choose seeds that cover them all)."""
    found = {f"relay-{'on' if schedule.relay else 'off'}"}
    full = False
    for step in schedule.steps:
        pushes: list[Push] = []
        match step:
            case Push():
                pushes = [step]
            case Concurrent():
                found.add("concurrent")
                pushes = list(step.pushes)
            case Burst():
                found.add("burst")
            case Acquire():
                found.add("acquire-on-full-disk" if full else "acquire")
            case AcquireRace():
                found.add("acquire-race")
            case Stall():
                # Meaningful when the stalled writer is surely the current one: it acquires
                # first, with room on the disk to record that.
                current = step.acquire_first and not full
                found.add(f"stall-then-{step.end}" if current or step.end != "hold" else "")
                fenced = any(what == "acquire" for what, _ in step.during)
                if current and step.end == "commit" and fenced:
                    found.add("fenced-while-streaming")
            case KillService():
                found.add("restart-sigterm" if step.graceful else "restart-kill-9")
                if step.mid_push is not None:
                    found.add("kill-9-mid-push")
            case KillRelay():
                found.add("kill-relay")
            case StartTrainer():
                found.add("trainer")
            case KillTrainer():
                found.add("kill-trainer")
            case FillDisk():
                full = True
                found.add("full-disk")
            case FreeDisk():
                full = False
        for push in pushes:
            if push.cut:
                found.add(f"cut-{push.cut}")
            if push.forged:
                found.add("forged-epoch")
            if full:
                found.add("push-on-full-disk")
    found.discard("")
    return found


FEATURES = (
    "relay-on",
    "relay-off",
    "concurrent",
    "acquire",
    "acquire-on-full-disk",
    "acquire-race",
    "fenced-while-streaming",
    "stall-then-cancel",
    "stall-then-hold",
    "restart-kill-9",
    "restart-sigterm",
    "kill-9-mid-push",
    "kill-relay",
    "trainer",
    "kill-trainer",
    "full-disk",
    "push-on-full-disk",
    "cut-after-header",
    "cut-mid-payload",
    "cut-before-commit",
    "cut-after-commit",
    "forged-epoch",
)
