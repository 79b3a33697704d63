"""The invariants a fault schedule checks at every quiet point, and what they read.

`Invariants` is the checking half of a schedule's run (the acting half: `leases.py`,
`pushes.py` and `processes.py`, brought together by `Run` in `harness.py`): the served weights
equal some acknowledged version bit for bit, nothing acknowledged is lost, no fenced writer's
push is served, the lease on disk equals the last one answered, no call is answered with a
status that means a bug, and no partial file is left (`tests/faults/model.py` lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
from safetensors import safe_open

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.weights.digest import state_digest
from tests.faults import stamp
from tests.faults.cluster import wait_for
from tests.faults.writer import Answer

QUIET_S = 30.0  # how long a push may stay pending once its writer is gone
BUGS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # never a right answer


class Abort(Exception):
    """The schedule cannot go on (the service is gone); its violation is recorded."""


class Invariants:
    """Checks over a run's state (`Run` in harness.py provides the attributes they read)."""

    def check_code(self, what: str, answer: Answer) -> None:
        """No call is answered with a status that means a bug (docs/status-codes.md)."""
        if answer.code in BUGS:
            self.violate(
                f"bug:{what}:{answer.code.name}",
                f"{what} answered {answer.code.name} ({answer.details}): a bug by the status table",
            )

    def check(self, final: bool = False) -> None:
        cluster = self.cluster
        if not cluster.service_alive():
            assert cluster.service is not None
            tail = cluster.service_log().read_text(errors="replace")[-2000:]
            self.violate(
                "service-died",
                f"the inference service exited on its own (status "
                f"{cluster.service.returncode}): {tail}",
            )
            raise Abort
        self.read_trainer_logs()
        self.check_trainer_exits()
        state = self.served()
        self.adopt_trainer_grant(state)
        if state.HasField("pending") and not cluster.any_trainer_alive():

            def idle() -> bool:
                now = cluster.get_model(10)
                return now is not None and not now.HasField("pending")

            if not wait_for(idle, QUIET_S, 0.1):
                pending = state.pending
                self.violate(
                    "pending-forever",
                    f"the push of version {pending.version} by {pending.writer_id!r} is still "
                    f"in progress ({pending.bytes_received} of {pending.payload_bytes} bytes) "
                    "though no writer is sending: it was never ended",
                )
            state = self.served()
        self.check_state(state.version, state.digest, state.writer_id, "served")
        floor = self.ledger.floor()
        if state.version < floor:
            self.violate(
                f"lost:{floor}",
                f"version {state.version} is served but version {floor} was answered OK "
                f"(or was on disk when the service went down): an acknowledged version was lost",
            )
        if state.version < self.ledger.seen:
            self.violate(
                f"backwards:{state.version}",
                f"the served version went back from {self.ledger.seen} to {state.version} "
                "without a restart",
            )
        self.ledger.seen = max(self.ledger.seen, state.version)
        self.check_lease(state)
        self.check_data_plane()
        self.check_disk(final)

    def check_state(self, version: int, digest: bytes, writer: str, where: str) -> None:
        why = self.ledger.unknown_state(version, digest, writer)
        if why:
            self.violate(
                f"state:{version}:{digest.hex()}",
                f"{where} version {version} by {writer!r} is no version a writer may have "
                f"committed: {why}",
            )
        fenced = self.ledger.fenced_commit(version, writer)
        if fenced:
            self.violate(f"fence:{version}:{writer}", f"{where}: {fenced}")

    def adopt_trainer_grant(self, state: pb.ModelState) -> None:
        """Record the grant of a trainer that was started on a full disk, once it shows."""
        holder, epoch = state.lease_holder, state.writer_epoch
        if holder in self._awaiting_grant and epoch > self.ledger.lease()[0]:
            self._awaiting_grant.discard(holder)
            self.note(f"{holder} granted epoch {epoch}")
            self.ledger.grant(self.step, holder, epoch, state.version)

    def check_lease(self, state: pb.ModelState) -> None:
        if self._awaiting_grant and self.ledger.lease() != self.cluster.lease_file():
            state = self.served()  # a trainer may have just become the writer
            self.adopt_trainer_grant(state)
        lease = self.ledger.lease()
        reported = (state.writer_epoch, state.lease_holder)
        if reported != lease:
            self.violate(
                "lease-memory",
                f"GetModel reports writer {state.lease_holder!r} epoch {state.writer_epoch}, but "
                f"the last grant answered was epoch {lease[0]} to {lease[1]!r}",
            )
        on_disk = self.cluster.lease_file()
        if (on_disk or (0, "")) != lease:
            self.violate(
                "lease-disk",
                f"writer.json holds {on_disk}, but the last grant answered was epoch {lease[0]} "
                f"to {lease[1]!r}",
            )

    def check_data_plane(self) -> None:
        answer = self.cluster.infer()
        if isinstance(answer, grpc.RpcError):
            self.violate(
                f"infer:{answer.code().name}",
                f"the data plane answered {answer.code().name}: {answer.details()}",
            )
            return
        version, fills = answer
        why = self.ledger.unknown_output(version, fills)
        if why:
            self.violate(
                f"output:{version}:{fills}",
                f"the data plane answered version {version} with tensor means {list(fills)}, "
                f"which no version may serve: {why}",
            )

    def stored_versions(self) -> list[tuple[int, str, bytes]]:
        """The whole version files on disk (each checked once): (version, writer, digest)."""
        found = []
        for path in sorted(self.cluster.model_dir.glob("[0-9]*.safetensors")):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            key = (path.name, stat.st_size, stat.st_mtime_ns)
            if key not in self._files:
                self._files[key] = read_version_file(path)
            info = self._files[key]
            if isinstance(info, str):
                if path.exists():
                    self.violate(f"file:{path.name}", f"{path.name} is not a whole version: {info}")
                continue
            found.append(info)
        return found

    def check_disk(self, final: bool) -> None:
        for version, writer, digest in self.stored_versions():
            self.check_state(version, digest, writer, f"version file {version:012d}")
        if final and "temp" not in self._keys:  # the last writes settle
            wait_for(lambda: not temp_files(self.cluster.state), QUIET_S, 0.1)
        seen: dict[str, tuple[int, int]] = {}
        stale: list[Path] = []  # unchanged since the last quiet point
        for path in temp_files(self.cluster.state):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            name = str(path.relative_to(self.cluster.state))
            signature = (stat.st_size, stat.st_mtime_ns)
            seen[name] = signature
            if final or self._tmp_seen.get(name) == signature:
                stale.append(path)
        if stale and "temp" not in self._keys:
            if not final:  # give a slow writer time to move on before calling it left behind
                waits = [changed(p, seen[str(p.relative_to(self.cluster.state))]) for p in stale]
                wait_for(lambda: all(w() for w in waits), QUIET_S, 0.2)
                stale = [p for p, w in zip(stale, waits, strict=True) if not w()]
            if stale:
                names = ", ".join(str(p.relative_to(self.cluster.state)) for p in stale[:3])
                more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
                self.violate(
                    "temp",
                    f"partial writes were left on disk ({names}{more}): "
                    + ("still there at the end" if final else "unchanged since the last step"),
                )
        self._tmp_seen = seen


def changed(path: Path, signature: tuple[int, int]) -> Callable[[], bool]:
    """Whether the file has changed (or gone) since it had `signature` (size, mtime)."""

    def check() -> bool:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return True
        return (stat.st_size, stat.st_mtime_ns) != signature

    return check


def temp_files(state: Path) -> list[Path]:
    models = state / "models"
    if not models.exists():
        return []
    return [p for p in models.rglob("*") if p.is_file() and ".tmp" in p.name]


def read_version_file(path: Path) -> tuple[int, str, bytes] | str:
    """(version, writer, digest) of a version file, checked whole; what is wrong, if not."""
    try:
        with safe_open(str(path), framework="pt") as stored:
            meta = stored.metadata() or {}
            tensors = {k: stored.get_tensor(k) for k in stored.keys()}  # noqa: SIM118
    except FileNotFoundError:
        return "removed while read"
    except Exception as exc:  # safetensors raises its own error types for a bad file
        return f"unreadable ({type(exc).__name__}: {exc})"
    if sorted(tensors) != sorted(stamp.names()):
        return f"holds tensors {sorted(tensors)}"
    try:
        version = int(meta["version"])
        stated = bytes.fromhex(meta["digest"])
    except (KeyError, ValueError) as exc:
        return f"bad metadata {meta}: {exc}"
    digest = state_digest(tensors)
    if digest != stated:
        return f"its tensors hash to {digest.hex()} but it says {stated.hex()}"
    if int(path.name.split(".")[0]) != version:
        return f"it holds version {version}"
    return version, meta.get("writer_id", ""), digest
