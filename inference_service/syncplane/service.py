"""The sync plane's use-case layer: the models by name, their writers, history and rollback,
pushes through the one push handler (handler.py), and seeds of other replicas (seed.py)."""

from __future__ import annotations

import itertools
import logging
import re
import uuid
from collections.abc import Callable, Mapping

from inference_service.lease import COUNTER_LIMIT, check_counter
from inference_service.persistence import StoredVersion, WeightStore
from inference_service.served_model import Generation, ServedModel
from inference_service.syncplane.apply import PushApplier
from inference_service.syncplane.checks import model_named
from inference_service.syncplane.forward import PeerAccess
from inference_service.syncplane.handler import PushHandler
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.own import OwnAddress
from inference_service.syncplane.parts import Commit, Hop, HopResult, PushHeader
from inference_service.syncplane.seed import Seeder
from shared.errors import (
    InferenceOnlyModelError,
    MalformedPushError,
    OutOfRangeError,
    PushRejectedError,
    StoredVersionDamagedError,
)

logger = logging.getLogger(__name__)
_ROLLED_BACK = re.compile(r"^(rollback to \d+ of )+")


class SyncPlane:
    """What the weightsync.v1 servicer (and the relay's push link, through `push`) serves.

    `on_commit(name)` hears of each commit (the history writer); `store`, the history on disk,
    is what versions are listed from and rolled back to (None: no history kept); `peers`, how
    pushes are passed on down their routes (syncplane/forward.py). `instance_id`, drawn at
    random, names this service in GetModel's answers: a trainer that reaches it through several
    addresses learns that they are one service, and feeds it once."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        limits: SyncLimits,
        on_commit: Callable[[str], None] | None = None,
        store: WeightStore | None = None,
        peers: PeerAccess | None = None,
    ) -> None:
        self._models = models
        self.instance_id = uuid.uuid4().hex
        self.store = store
        self.applier = PushApplier(models, limits, on_commit)
        self._own = OwnAddress()
        self.push = PushHandler(self.applier, limits.push_idle_timeout_s, peers, self._own)
        self._seeder = Seeder(
            peers or PeerAccess(answer_timeout_s=limits.push_idle_timeout_s), self._own
        )

    def model(self, name: str) -> ServedModel:
        return model_named(self._models, name)

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self._models

    def acquire_writer(self, name: str, writer_id: str) -> int:
        """Make `writer_id` the only writer of `name`; earlier writers are fenced from now on."""
        model = self.model(name)
        if not model.accepts_pushes:
            raise InferenceOnlyModelError(
                f"model {model.name!r} is inference-only: it has no writer"
            )
        epoch = model.lease.grant(writer_id)
        logger.info("model %s: %s is the writer now (epoch %d)", name, writer_id, epoch)
        return epoch

    def versions(self, name: str) -> list[StoredVersion]:
        """The versions of `name` kept on disk, newest first."""
        self.model(name)
        return self._history().versions(name)

    def rollback(self, name: str, to_version: int) -> Generation:
        """Serve stored version `to_version` again, committed as the next version: a push of
        the stored file, under the current writer's epoch."""
        check_counter("to_version", to_version)
        model = self.model(name)
        if not model.accepts_pushes:
            raise InferenceOnlyModelError(
                f"model {name!r} is inference-only: it serves its pretrained weights and takes "
                "no pushes, rollbacks included"
            )
        stored = self._history().find(name, to_version)
        version = model.live.version + 1
        if version >= COUNTER_LIMIT:
            raise OutOfRangeError(
                f"model {name!r} serves version {version - 1}, the last below 2^63: no version "
                "can follow it"
            )
        header = PushHeader(
            name,
            version,
            0,
            # Of the trainer that pushed those weights, however many rollbacks served them
            # since: the writer id stays as long as one rollback's, not one more per rollback.
            f"rollback to {to_version} of {_ROLLED_BACK.sub('', stored.writer_id) or 'unknown'}",
            stored.size_bytes,
            model.lease.epoch,
        )
        try:
            return self.applier.apply(
                header, itertools.chain(stored.chunks(), [Commit(stored.digest)])
            )
        except MalformedPushError as exc:  # the file no longer checks out
            logger.error("model %s: rollback to stored version %d: %s", name, to_version, exc)
            raise StoredVersionDamagedError(
                f"model {name!r}: the stored version {to_version} is damaged: its file no "
                "longer matches the digest kept with it, so it cannot be served again; "
                "nothing was swapped"
            ) from None

    def serving_at(self, listen: str, port: int) -> None:
        """Where this sync plane is reached (its listen address and bound port): a seed to it,
        or a route that names it, is refused."""
        self._own.serving_at(listen, port)

    def seed(self, name: str, version: int, hop: Hop) -> HopResult:
        """Push `name`'s served version, which must be `version`, to the replica `hop` (see
        seed.py): what became of it there."""
        return self._seeder.seed(self.model(name), version, hop)

    def _history(self) -> WeightStore:
        if self.store is None:
            raise PushRejectedError(
                "this inference service keeps no version history: start it with --state-dir"
            )
        return self.store
