"""The lease steps of a fault schedule: AcquireWriter, alone or racing, and what a grant must be.

A mixin of `Run` (tests/faults/harness.py), which provides the attributes it reads.
"""

from __future__ import annotations

import threading

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.faults.invariants import BUGS
from tests.faults.steps import AcquireRace
from tests.faults.writer import Answer, RawWriter

RACERS = 2  # concurrent AcquireWriter calls per writer in a race


class Leases:
    def acquire(self, index: int) -> None:
        writer = self.writers[index]
        answer = writer.acquire()
        if isinstance(answer, Answer):
            self.refused(writer, answer, "")
            return
        self.granted(writer, answer)

    def refused(self, writer: RawWriter, answer: Answer, how: str) -> None:
        """An AcquireWriter (`how`: " (racing)" in a race) that was not granted: only a full
        disk may refuse one, and never with a status that means a bug."""
        self.note(f"AcquireWriter {writer.id}: {answer.describe()}")
        self.check_code(f"AcquireWriter by {writer.id}", answer)
        if not self.ledger.disk_full and answer.code not in BUGS:
            self.violate(
                f"acquire-refused:{answer.code.name}",
                f"AcquireWriter by {writer.id}{how} was refused with the disk not full: "
                f"{answer.describe()}",
            )

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
                self.refused(writer, answer, " (racing)")
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
