"""The push steps of a fault schedule: whole, cut, concurrent, in bursts, stalled; and how
each one's answer is recorded in the ledger.

A mixin of `Run` (tests/faults/harness.py), which provides the attributes it reads.
"""

from __future__ import annotations

import time

import grpc

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.faults import stamp
from tests.faults.cluster import START_TIMEOUT_S, wait_for
from tests.faults.invariants import QUIET_S, Abort
from tests.faults.model import IN_DOUBT, OK, REFUSED, UNSENT, Attempt
from tests.faults.steps import Burst, Concurrent, Push, Stall
from tests.faults.writer import Answer, Plan, RawWriter, Stream

IDLE_S = 4  # the silent-push limit the service gets, when it has such a setting
HOLD_LIMIT_S = 20.0  # how long a held (silent) push is given to be ended by the service
ANSWER_S = 60.0  # how long a push that is not stalled may take to be answered
TRANSPORT = (
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


class Pushes:
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
            self.check_code(f"Push by {plan.writer}", answer)
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
