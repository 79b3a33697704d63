"""A model's writer lease: the one writer allowed to push it, fenced by epoch, kept on disk.

`AcquireWriter` grants the lease: the epoch goes up by one and the caller becomes the holder;
every push carries the epoch it was granted, and only the current one may commit. The lease
moves only by a grant, never by a push: a push with an older epoch is fenced (another writer
took over), one with a newer epoch than any granted here is refused as unknown (the service lost
its lease, e.g. restarted without a state directory; the writer should acquire again). Epoch 0
is the lease of no one: pushes that carry it are accepted until the first grant.

A grant and a commit are ordered by one lock: the grant holds it while it records the new lease
and a commit holds it while it checks its epoch and swaps the weights, so a push whose writer was
fenced while it streamed never commits. With a state directory the lease lives in
`<model folder>/writer.json`; a grant is written there durably (temp file, fsync, rename, fsync
of the folder) before it changes the lease in memory or is answered, so what is on disk is
always what was last answered, and a restart keeps fencing the writers fenced before it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.durable import fsync_path
from shared.errors import (
    ConfigurationError,
    FencedError,
    OutOfRangeError,
    UnavailableError,
    UnknownEpochError,
)

logger = logging.getLogger(__name__)

# Epochs and versions are uint64 on the wire; keeping them below 2^63 lets them pass through
# any int64 (JSON readers, signed peers) unchanged. Values at or past it are refused.
COUNTER_LIMIT = 1 << 63
LEASE_FILE = "writer.json"


def check_counter(what: str, value: int) -> None:
    """Refuse an epoch or version at or past COUNTER_LIMIT (OutOfRangeError)."""
    if not 0 <= value < COUNTER_LIMIT:
        raise OutOfRangeError(f"{what} {value} is out of range: it must be below 2^63")


class WriterLease:
    """The writer lease of one model; thread-safe."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self._granted: tuple[int, str] = (0, "")  # (epoch, holder), replaced whole
        self._folder: Path | None = None

    @property
    def epoch(self) -> int:
        return self._granted[0]

    @property
    def holder(self) -> str:
        return self._granted[1]

    def snapshot(self) -> tuple[int, str]:
        """The epoch and the holder, as one grant left them."""
        return self._granted

    def attach(self, folder: Path) -> None:
        """Keep the lease in `folder`/writer.json from now on, starting from what it holds.

        A file that cannot be read or holds no valid lease raises ConfigurationError: starting
        without it would let writers fenced before the restart push again."""
        path = folder / LEASE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = None
        except OSError as exc:
            raise ConfigurationError(
                f"model {self.model_name!r}: cannot read {path}: {exc}"
            ) from None
        granted = (0, "") if text is None else _parse(path, text)
        with self._lock:
            self._folder = folder
            self._granted = granted
        if text is not None:
            epoch, holder = granted
            logger.info(
                "model %s: writer %r (epoch %d) restored from %s",
                self.model_name,
                holder,
                epoch,
                path,
            )

    def grant(self, writer_id: str) -> int:
        """Make `writer_id` the holder under the next epoch, recorded on disk first; return it.

        UnavailableError when the disk refuses the record: nothing changes then."""
        with self._lock:
            epoch = self._granted[0] + 1
            if epoch >= COUNTER_LIMIT:
                raise OutOfRangeError(
                    f"model {self.model_name!r}: the writer epoch cannot go past "
                    f"{COUNTER_LIMIT - 1}; remove {LEASE_FILE} from the model's state folder "
                    "(with every writer stopped) to start over"
                )
            if self._folder is not None:
                try:
                    self._record(self._folder, epoch, writer_id)
                except OSError as exc:
                    logger.error(
                        "model %s: cannot record writer %r (epoch %d): %s",
                        self.model_name,
                        writer_id,
                        epoch,
                        exc,
                    )
                    raise UnavailableError(
                        f"model {self.model_name!r}: could not record the new writer on disk "
                        f"({exc.strerror or exc}); the writer is still {self._granted[1]!r} "
                        f"(epoch {self._granted[0]}); retry once the state directory is writable"
                    ) from None
            self._granted = (epoch, writer_id)
            return epoch

    def check(self, epoch: int, writer_id: str) -> None:
        """Refuse a push under `epoch` unless it is the current one (FencedError if older,
        UnknownEpochError if newer)."""
        if epoch == self._granted[0]:  # the common case, without the lock
            return
        with self._lock:
            self._check(epoch, writer_id)

    @contextmanager
    def fenced(self, epoch: int, writer_id: str) -> Iterator[None]:
        """Hold off grants while the block runs (a commit), once `epoch` is checked current."""
        with self._lock:
            self._check(epoch, writer_id)
            yield

    def _check(self, epoch: int, writer_id: str) -> None:
        current, holder = self._granted
        if epoch == current:
            return
        if epoch < current:
            raise FencedError(
                f"model {self.model_name!r} is written by {holder!r} (epoch {current}); this "
                f"push from {writer_id!r} carries epoch {epoch} and is fenced"
            )
        raise UnknownEpochError(
            f"model {self.model_name!r}: this push from {writer_id!r} carries epoch {epoch}, "
            f"newer than the newest granted here ({current}); the service lost the lease it "
            "granted (a restart without --state-dir?): call AcquireWriter again"
        )

    @staticmethod
    def _record(folder: Path, epoch: int, holder: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{LEASE_FILE}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump({"epoch": epoch, "holder": holder}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, folder / LEASE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(folder)


def _parse(path: Path, text: str) -> tuple[int, str]:
    """The (epoch, holder) a lease file holds; ConfigurationError if it holds no valid one."""

    def refuse(problem: str) -> ConfigurationError:
        return ConfigurationError(
            f"{path}: {problem}; the writer lease cannot be restored, and starting without it "
            "would let writers fenced before the restart push again. Fix the file, or remove "
            "it with every writer stopped"
        )

    try:
        lease = json.loads(text)
    except ValueError as exc:
        raise refuse(f"not valid JSON ({exc})") from None
    if not isinstance(lease, dict):
        raise refuse("not a JSON object")
    epoch, holder = lease.get("epoch"), lease.get("holder")
    if type(epoch) is not int or not isinstance(holder, str):
        raise refuse('it must hold {"epoch": <integer>, "holder": <string>}')
    if not 0 <= epoch < COUNTER_LIMIT:
        raise refuse(f"epoch {epoch} is out of range (0 to 2^63-1)")
    return epoch, holder
