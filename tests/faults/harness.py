"""Run one fault schedule against real processes and check the invariants after every step.

`run_schedule(schedule, root, out)` starts an inference service on a state directory (a small
tmpfs when it can mount one), executes the steps one by one, and after each (a quiet point: no
push of the harness in flight) checks what `tests/faults/model.py` lists. Each violation is
reported once per schedule, with the seed and the step it was first seen after.
"""

from __future__ import annotations

import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.faults import stamp
from tests.faults.cluster import START_TIMEOUT_S, Cluster, ServiceDown, wait_for
from tests.faults.invariants import QUIET_S, Abort, Invariants
from tests.faults.model import IN_DOUBT, OK, REFUSED, UNSENT, Attempt, Ledger
from tests.faults.schedule import (
    WRITERS,
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
    Schedule,
    Stall,
    StartTrainer,
    Step,
    trainer_id,
    writer_id,
)
from tests.faults.writer import Answer, Plan, RawWriter, Stream

IDLE_S = 4  # the silent-push limit the service gets, when it has such a setting
HOLD_LIMIT_S = 20.0  # how long a held (silent) push is given to be ended by the service
RACERS = 2  # concurrent AcquireWriter calls per writer in a race
ANSWER_S = 60.0  # how long a push that is not stalled may take to be answered
TRANSPORT = (
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
BUGS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TRAINER_ACK = re.compile(rf"model {stamp.MODEL}: version (\d+) committed on")


@dataclass
class Result:
    seed: int
    steps: int
    violations: list[str] = field(default_factory=list)
    root: Path | None = None


class Run(Invariants):
    def __init__(self, schedule: Schedule, root: Path, out: Callable[[str], None]) -> None:
        self.schedule = schedule
        self.out = out
        self.cluster = Cluster(root, schedule.relay, IDLE_S)
        self.ledger = Ledger()
        self.writers: dict[int, RawWriter] = {}
        self.violations: list[str] = []
        self._keys: set[str] = set()
        self.step = -1
        self.steps_run = 0
        self._streams: list[Stream] = []
        self._log_offsets: dict[Path, int] = {}
        self._trainer_acks: dict[int, int] = {}
        self._awaiting_grant: set[str] = set()  # trainers started, not yet seen granted
        self._killed: set[int] = set()  # pids of trainer processes the harness killed
        self._exits_seen: set[int] = set()
        self._tmp_seen: dict[str, tuple[int, int]] = {}
        self._files: dict[tuple[str, int, int], tuple[int, str, bytes] | str] = {}

    # -- reporting -----------------------------------------------------------------------------

    def _where(self) -> str:
        steps = self.schedule.steps
        if self.step < 0:
            return "start"
        if self.step >= len(steps):
            return "end"
        return f"step {self.step} [{steps[self.step].describe()}]"

    def violate(self, key: str, message: str) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        text = f"seed={self.schedule.seed} {self._where()}: {message}"
        self.violations.append(text)
        self.out(f"    VIOLATION {text}")

    def note(self, message: str) -> None:
        self.out(f"    {message}")

    def _bug_code(self, what: str, answer: Answer) -> None:
        if answer.code in BUGS:
            self.violate(
                f"bug:{what}:{answer.code.name}",
                f"{what} answered {answer.code.name} ({answer.details}): a bug by README's "
                "status table",
            )

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Result:
        try:
            if not self.cluster.mount():
                self.note(
                    f"no tmpfs for the state directory ({self.cluster.mount_error}): the "
                    "full-disk steps are skipped"
                )
            self.cluster.start_service()
            self.writers = {
                i: RawWriter(writer_id(i), self.cluster.sync_address) for i in range(WRITERS)
            }
            self.check()
            for index, step in enumerate(self.schedule.steps):
                self.step = index
                self.out(f"  step {index}: {step.describe()}")
                self.execute(step)
                self.steps_run += 1
                self.check()
            self.step = len(self.schedule.steps)
            self.out("  end: restart-service (SIGTERM), then the last checks")
            self.restart(graceful=True)
            self.check(final=True)
        except ServiceDown as exc:
            self.violate("service-down", str(exc))
        except Abort:
            pass
        except Exception:  # a bug of the harness: reported like a violation, the run goes on
            self.violate("harness-error", f"the harness failed:\n{traceback.format_exc()}")
        finally:
            for stream in self._streams:
                stream.cancel()
            for writer in self.writers.values():
                writer.close()
            for problem in self.cluster.close():
                self.out(f"  WARNING {problem}")
        return Result(self.schedule.seed, self.steps_run, self.violations)

    def execute(self, step: Step) -> None:
        match step:
            case Push():
                self.push(step)
            case Acquire():
                self.acquire(step.writer)
            case AcquireRace():
                self.acquire_race(step)
            case Concurrent():
                self.concurrent(step)
            case Burst():
                self.burst(step)
            case Stall():
                self.stall(step)
            case KillService():
                self.kill_service(step)
            case KillRelay():
                self.kill_relay(step)
            case StartTrainer():
                self.start_trainer(step.trainer)
            case AwaitTrainer():
                self.await_trainer(step)
            case KillTrainer():
                self.kill_trainer(step.trainer)
            case FillDisk():
                self.fill_disk()
            case FreeDisk():
                self.free_disk()

    # -- leases --------------------------------------------------------------------------------

    def acquire(self, index: int) -> None:
        writer = self.writers[index]
        answer = writer.acquire()
        if isinstance(answer, Answer):
            self.note(f"AcquireWriter {writer.id}: {answer.describe()}")
            self._bug_code(f"AcquireWriter by {writer.id}", answer)
            if not self.ledger.disk_full and answer.code not in BUGS:
                self.violate(
                    f"acquire-refused:{answer.code.name}",
                    f"AcquireWriter by {writer.id} was refused with the disk not full: "
                    f"{answer.describe()}",
                )
            return
        self.granted(writer, answer)

    def granted(self, writer: RawWriter, lease: pb.WriterLease) -> None:
        last = self.ledger.lease()
        self.note(f"{writer.id} granted epoch {lease.epoch} (version {lease.version} served)")
        if lease.epoch <= last[0]:
            self.violate(
                f"epoch-reused:{lease.epoch}",
                f"{writer.id} was granted epoch {lease.epoch}, not above the last grant answered "
                f"(epoch {last[0]} to {last[1]!r})",
            )
        writer.epoch = lease.epoch
        self.ledger.grant(self.step, writer.id, lease.epoch, lease.version)

    def acquire_race(self, step: AcquireRace) -> None:
        for _ in range(step.rounds):
            self.race_round(step.writers)

    def race_round(self, writers: tuple[int, ...]) -> None:
        """These writers call AcquireWriter at the same moment, RACERS calls each."""
        callers = [w for w in writers for _ in range(RACERS)]
        barrier = threading.Barrier(len(callers))
        answers: list[tuple[int, pb.WriterLease | Answer]] = []

        def call(index: int) -> None:
            barrier.wait()
            answers.append((index, self.writers[index].acquire()))

        threads = [threading.Thread(target=call, args=(w,)) for w in callers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        leases: list[tuple[RawWriter, pb.WriterLease]] = []
        for index, answer in answers:
            writer = self.writers[index]
            if isinstance(answer, Answer):
                self.note(f"AcquireWriter {writer.id}: {answer.describe()}")
                self._bug_code(f"AcquireWriter by {writer.id}", answer)
                if not self.ledger.disk_full and answer.code not in BUGS:
                    self.violate(
                        f"acquire-refused:{answer.code.name}",
                        f"AcquireWriter by {writer.id} (racing) was refused with the disk "
                        f"not full: {answer.describe()}",
                    )
            else:
                leases.append((writer, answer))
        epochs = [lease.epoch for _, lease in leases]
        if len(set(epochs)) != len(epochs):
            self.violate(
                "epoch-twice",
                "racing AcquireWriter calls were granted the same epoch: "
                + ", ".join(f"{w.id}={e.epoch}" for w, e in leases),
            )
        for writer, lease in sorted(leases, key=lambda pair: pair[1].epoch):
            self.granted(writer, lease)

    # -- pushes --------------------------------------------------------------------------------

    def served(self) -> pb.ModelState:
        state = self.cluster.get_model()
        if state is None:
            self.violate("getmodel", "GetModel got no answer: the sync plane is gone")
            raise Abort
        return state

    def plan(self, push: Push, state: pb.ModelState) -> Plan:
        writer = self.writers[push.writer]
        epoch = self.ledger.lease()[0] + push.forged if push.forged else writer.epoch
        version = state.version + push.ahead
        if push.delta_parts and state.version > 0:  # (a delta on version 0 would read as full)
            base = self.ledger.fills_of(state.digest)
            if base is not None:
                fills = tuple(
                    push.fills[i] if i in push.delta_parts else base[i] for i in range(stamp.PARTS)
                )
                return Plan(writer.id, epoch, version, state.version, fills, push.delta_parts)
            self.note("the served state is unknown to the harness: pushing in full instead")
        return Plan(writer.id, epoch, version, 0, push.fills, None)

    def must_commit(self, push: Push, plan: Plan) -> bool:
        """Whether nothing but a defect can refuse this push: the current writer (or epoch 0
        before any grant), a newer version, no cut, and nothing else pushing."""
        epoch, holder = self.ledger.lease()
        current = (plan.epoch, plan.writer) == (epoch, holder) if epoch else plan.epoch == 0
        return (
            current
            and push.cut is None
            and push.ahead > 0
            and not push.forged
            and not self.cluster.any_trainer_alive()
        )

    def push(self, push: Push) -> None:
        writer = self.writers[push.writer]
        plan = self.plan(push, self.served())
        expect = self.must_commit(push, plan)
        _, answer = self.stream_push(writer, plan, push.cut, push.how)
        if expect and not answer.ok:
            self.violate(
                f"refused:{answer.code.name}",
                f"a push by the current writer {writer.id} (epoch {plan.epoch}) of version "
                f"{plan.version}, with no other push in flight, was refused: {answer.describe()}",
            )

    def stream_push(
        self, writer: RawWriter, plan: Plan, cut: str | None, how: str, answer_s: float = ANSWER_S
    ) -> tuple[Attempt, Answer]:
        attempt = self.ledger.attempt(self.step, writer.id, plan.epoch, plan.version, plan.fills)
        stream = writer.stream(plan)
        self._streams.append(stream)
        try:
            stream.send_header()
            if cut == "after-header":
                return attempt, self.cut(writer, stream, attempt, how)
            if cut == "mid-payload":
                stream.send_data(max(1, len(stream.data) // 2))
                return attempt, self.cut(writer, stream, attempt, how)
            stream.send_data()
            if cut == "before-commit":
                return attempt, self.cut(writer, stream, attempt, how)
            attempt.lease_at_commit = self.ledger.lease()
            stream.send_commit()
            if cut == "after-commit":
                return attempt, self.cut(writer, stream, attempt, how)
            stream.half_close()
            answer = stream.answer(answer_s)
            self.settle(attempt, plan, answer, commit_sent=True)
            return attempt, answer
        finally:
            self._streams.remove(stream)

    def cut(self, writer: RawWriter, stream: Stream, attempt: Attempt, how: str) -> Answer:
        stream.wait_taken()
        if how == "disconnect":
            writer.disconnect()
        elif how == "half-close":
            stream.half_close()
        else:
            stream.cancel()
        answer = stream.answer(ANSWER_S)
        self.settle(attempt, stream.plan, answer, stream.commit_queued)
        return answer

    def settle(self, attempt: Attempt, plan: Plan, answer: Answer, commit_sent: bool) -> None:
        """Record how a push ended (a transport error after the commit was sent leaves it in
        doubt), and check an OK answer."""
        if answer.ok:
            attempt.outcome = OK
            response = answer.response
            assert response is not None
            if (response.version, response.digest) != (plan.version, plan.digest):
                self.violate(
                    f"answer:{plan.version}",
                    f"a push of version {plan.version} was answered OK with version "
                    f"{response.version} digest {response.digest.hex()} (pushed "
                    f"{plan.digest.hex()})",
                )
            lease = attempt.lease_at_commit
            if lease is not None and plan.epoch != lease[0]:
                self.violate(
                    f"fenced-ok:{plan.writer}:{plan.version}",
                    f"a push by {plan.writer} carrying epoch {plan.epoch} was answered OK "
                    f"(version {plan.version}) though the last grant answered before its commit "
                    f"was epoch {lease[0]} to {lease[1]!r}: only the current writer may commit",
                )
            self.ledger.ack(plan.version)
        elif answer.code in TRANSPORT:
            attempt.outcome = IN_DOUBT if commit_sent else UNSENT
            attempt.detail = answer.describe()
        else:
            attempt.outcome = REFUSED
            attempt.detail = answer.describe()
            self._bug_code(f"Push by {plan.writer}", answer)
        self.note(attempt.describe())

    def concurrent(self, step: Concurrent) -> None:
        state = self.served()
        started: list[tuple[Attempt, Stream]] = []
        for push in step.pushes:
            writer = self.writers[push.writer]
            plan = self.plan(push, state)
            attempt = self.ledger.attempt(
                self.step, writer.id, plan.epoch, plan.version, plan.fills
            )
            stream = writer.stream(plan)
            self._streams.append(stream)
            stream.send_header()
            started.append((attempt, stream))
        try:
            for attempt, stream in started:
                attempt.lease_at_commit = self.ledger.lease()
                stream.send_commit()
                stream.half_close()
            for attempt, stream in started:
                self.settle(attempt, stream.plan, stream.answer(ANSWER_S), True)
        finally:
            for _, stream in started:
                self._streams.remove(stream)

    def burst(self, step: Burst) -> None:
        for k, fills in enumerate(step.fills):
            delta = () if k == 0 else (k % stamp.PARTS,)
            self.push(Push(step.writer, fills, delta))

    def pending_is(self, plan: Plan) -> bool:
        state = self.cluster.get_model(10)
        return (
            state is not None
            and state.HasField("pending")
            and (state.pending.writer_id, state.pending.version) == (plan.writer, plan.version)
        )

    def stall(self, step: Stall) -> None:
        writer = self.writers[step.writer]
        if step.acquire_first:
            self.acquire(step.writer)
        state = self.served()
        plan = Plan(writer.id, writer.epoch, state.version + 1, 0, step.fills, None)
        attempt = self.ledger.attempt(self.step, writer.id, plan.epoch, plan.version, plan.fills)
        stream = writer.stream(plan)
        self._streams.append(stream)
        try:
            stream.send_header()
            if step.stage == "mid-payload":
                stream.send_data(len(stream.data) // 2)
            stream.wait_taken()
            # The service holds the push once GetModel shows it pending (or it answered).
            if not wait_for(lambda: stream.done() or self.pending_is(plan), START_TIMEOUT_S, 0.1):
                self.note("the service never showed the stalled push as pending")
            started = time.monotonic()
            for what, other in step.during:
                if what == "acquire":
                    self.acquire(other)
                else:
                    other_writer = self.writers[other]
                    now = self.served()
                    other_plan = Plan(
                        other_writer.id,
                        other_writer.epoch,
                        now.version + 1,
                        0,
                        step.other_fills,
                        None,
                    )
                    self.stream_push(other_writer, other_plan, None, "cancel", QUIET_S)
            left = step.seconds - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)  # the stall itself: the writer sends nothing for a while
            if step.end == "commit":
                attempt.lease_at_commit = self.ledger.lease()
                stream.send_commit()
                stream.half_close()
                self.settle(attempt, plan, stream.answer(ANSWER_S), True)
            elif step.end == "cancel":
                stream.cancel()
                self.settle(attempt, plan, stream.answer(ANSWER_S), False)
            elif step.end == "half-close":
                stream.half_close()
                self.settle(attempt, plan, stream.answer(ANSWER_S), False)
            else:
                self.hold(stream, attempt, plan)
        finally:
            self._streams.remove(stream)

    def hold(self, stream: Stream, attempt: Attempt, plan: Plan) -> None:
        """The writer stays connected and silent: the service has to end the push itself."""
        flag = self.cluster.idle_flag
        limit = HOLD_LIMIT_S + (IDLE_S if flag else 0)
        ended = wait_for(lambda: stream.done() or not self.pending_is(plan), limit, 0.2)
        if not ended:
            setting = f"with {flag} {IDLE_S}" if flag else "which has no setting to end them"
            self.violate(
                "stalled-never-ended",
                f"a push whose writer went silent (connected) was never ended by the service "
                f"({setting}): it still held the model when the harness gave up waiting",
            )
        stream.cancel()
        self.settle(attempt, plan, stream.answer(ANSWER_S), False)

    # -- process faults ------------------------------------------------------------------------

    def start_mid_push(self, push: Push | None) -> tuple[Attempt, Stream, Plan] | None:
        """Send `push` up to its cut point and leave it there (a fault follows)."""
        if push is None:
            return None
        writer = self.writers[push.writer]
        plan = self.plan(push, self.served())
        attempt = self.ledger.attempt(self.step, writer.id, plan.epoch, plan.version, plan.fills)
        stream = writer.stream(plan)
        self._streams.append(stream)
        stream.send_header()
        if push.cut == "mid-payload":
            stream.send_data(max(1, len(stream.data) // 2))
        elif push.cut == "before-commit":
            stream.send_data()
        elif push.cut == "after-commit":
            attempt.lease_at_commit = self.ledger.lease()
            stream.send_commit()
        stream.wait_taken()
        return attempt, stream, plan

    def end_mid_push(self, started: tuple[Attempt, Stream, Plan] | None) -> None:
        if started is None:
            return
        attempt, stream, plan = started
        answer = stream.answer(ANSWER_S)
        self._streams.remove(stream)
        self.settle(attempt, plan, answer, stream.commit_queued)

    def restart(self, graceful: bool) -> None:
        self.read_trainer_logs()
        code = self.cluster.stop_service(graceful)
        if graceful and code != 0:
            self.violate(f"stop-code:{code}", f"the service exited with status {code} on SIGTERM")
        self.read_trainer_logs()  # versions answered before it went down
        on_disk = max((v for v, _, _ in self.stored_versions()), default=0)
        self.ledger.restarted(on_disk, graceful)
        self.note(f"service down; newest version on disk {on_disk}; starting it again")
        self.cluster.start_service()
        for writer in self.writers.values():
            writer.disconnect()

    def kill_service(self, step: KillService) -> None:
        started = self.start_mid_push(step.mid_push)
        self.read_trainer_logs()
        if started is not None:
            self.cluster.stop_service(graceful=False)
            self.end_mid_push(started)
        self.restart(step.graceful)

    def kill_relay(self, step: KillRelay) -> None:
        if not self.schedule.relay:
            self.note("no relay in this schedule: skipped")
            return
        started = self.start_mid_push(step.mid_push)
        old = self.cluster.kill_relay()
        self.end_mid_push(started)
        if old is None:
            self.violate("no-relay", "the service runs with --sync-relay on but has no relay")
            return
        if not self.cluster.relay_back(old):
            self.violate("relay-gone", "the sync relay did not come back after kill -9")
            raise Abort
        for writer in self.writers.values():
            writer.disconnect()

    def start_trainer(self, index: int) -> None:
        tid = trainer_id(index)
        if self.cluster.trainer_alive(index):
            self.note(f"{tid} is already running")
            return
        self.ledger.trainers.add(tid)
        process = self.cluster.start_trainer(index, tid)
        if self.ledger.disk_full:
            # Its AcquireWriter is refused until there is space to record it: the grant is
            # taken from GetModel whenever it shows up.
            self.note(f"the disk is full: {tid} will become the writer when it can")
            self._awaiting_grant.add(tid)
            return

        def holds() -> bool:
            state = self.cluster.get_model(10)
            return state is not None and state.lease_holder == tid

        wait_for(lambda: process.poll() is not None or holds(), START_TIMEOUT_S, 0.2)
        state = self.served()
        if state.lease_holder != tid:
            self.violate(
                f"trainer-start:{tid}",
                f"{tid} did not become the writer (exit status {process.poll()}): "
                f"{self.trainer_log_tail(index)}",
            )
            return
        self.note(f"{tid} granted epoch {state.writer_epoch} (version {state.version} served)")
        self.ledger.grant(self.step, tid, state.writer_epoch, state.version)

    def await_trainer(self, step: AwaitTrainer) -> None:
        if not self.cluster.trainer_alive(step.trainer):
            self.note(f"{trainer_id(step.trainer)} is not running")
            return
        goal = self._trainer_acks.get(step.trainer, 0) + step.commits

        def reached() -> bool:
            self.read_trainer_logs()
            return self._trainer_acks.get(
                step.trainer, 0
            ) >= goal or not self.cluster.trainer_alive(step.trainer)

        if not wait_for(reached, START_TIMEOUT_S, 0.2):
            self.violate(
                f"trainer-stuck:{step.trainer}",
                f"{trainer_id(step.trainer)}, running, committed no new version: "
                f"{self.trainer_log_tail(step.trainer)}",
            )

    def kill_trainer(self, index: int) -> None:
        process = self.cluster.trainers.get(index)
        if process is None or process.poll() is not None:
            self.note(f"{trainer_id(index)} is not running")
            return
        self._killed.add(process.pid)
        self.cluster.kill_trainer(index)

    def fill_disk(self) -> None:
        if not self.cluster.mounted:
            self.note("skipped: the state directory is not on a tmpfs")
            return
        self.cluster.fill_disk()
        self.ledger.disk_full = True
        self.ledger.unpersistable = True

    def free_disk(self) -> None:
        if not self.cluster.mounted:
            self.note("skipped: the state directory is not on a tmpfs")
            return
        self.cluster.free_disk()
        self.ledger.disk_full = False

    # -- trainers' logs ------------------------------------------------------------------------

    def read_trainer_logs(self) -> None:
        for index, paths in self.cluster.trainer_logs.items():
            tid = trainer_id(index)
            for path in paths:
                offset = self._log_offsets.get(path, 0)
                try:
                    data = path.read_bytes()[offset:]
                except FileNotFoundError:
                    continue
                end = data.rfind(b"\n") + 1
                self._log_offsets[path] = offset + end
                for line in data[:end].decode(errors="replace").splitlines():
                    found = TRAINER_ACK.search(line)
                    if found is None:
                        continue
                    version = int(found[1])
                    self._trainer_acks[index] = self._trainer_acks.get(index, 0) + 1
                    self.ledger.ack(version)
                    fenced = self.ledger.fenced_commit(version, tid)
                    if fenced:
                        self.violate(f"fence:{version}:{tid}", f"{tid} was answered OK: {fenced}")

    def trainer_log_tail(self, index: int) -> str:
        paths = self.cluster.trainer_logs.get(index, [])
        if not paths:
            return "(no log)"
        lines = paths[-1].read_text(errors="replace").splitlines()
        return " | ".join(lines[-8:])

    def check_trainer_exits(self) -> None:
        for index, process in self.cluster.trainers.items():
            code = process.poll()
            if code is None or process.pid in self._exits_seen:
                continue
            self._exits_seen.add(process.pid)
            tid = trainer_id(index)
            if process.pid in self._killed or code == 0:
                continue
            if code == 3:
                own = [i for i, g in enumerate(self.ledger.grants) if g.holder == tid]
                later = self.ledger.grants[own[-1] + 1 :] if own else self.ledger.grants
                if not any(g.holder != tid for g in later):
                    self.violate(
                        f"trainer-fenced:{tid}",
                        f"{tid} stopped as fenced (exit 3) though no writer was granted the "
                        f"model after it: {self.trainer_log_tail(index)}",
                    )
                else:
                    self.note(f"{tid} stopped: fenced (exit 3)")
                continue
            self.violate(
                f"trainer-exit:{tid}:{code}",
                f"{tid} exited with status {code}: {self.trainer_log_tail(index)}",
            )


def run_schedule(schedule: Schedule, root: Path, out: Callable[[str], None] = print) -> Result:
    out(schedule.describe())
    root.mkdir(parents=True, exist_ok=True)
    result = Run(schedule, root, out).run()
    result.root = root
    out(
        f"schedule seed={schedule.seed}: {result.steps} steps, "
        f"{len(result.violations)} violation(s)"
    )
    return result
