"""The process steps of a fault schedule: the service restarted or killed, its relay killed,
trainers started, awaited and killed, the state disk filled and freed; and what the trainers'
logs and exit codes must show.

A mixin of `Run` (tests/faults/harness.py), which provides the attributes it reads.
"""

from __future__ import annotations

import re

from tests.faults import stamp
from tests.faults.cluster import START_TIMEOUT_S, wait_for
from tests.faults.invariants import Abort
from tests.faults.steps import AwaitTrainer, KillRelay, KillService, trainer_id

TRAINER_ACK = re.compile(rf"model {stamp.MODEL}: version (\d+) committed on")


class Processes:
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

    def set_disk_full(self, full: bool) -> None:
        """Fill the state disk to the last byte, or free it again (only a tmpfs can be)."""
        disk = self.cluster.disk
        if not disk.mounted:
            self.note("skipped: the state directory is not on a tmpfs")
            return
        if full:
            disk.fill()
            self.ledger.unpersistable = True
        else:
            disk.free()
        self.ledger.disk_full = full

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
