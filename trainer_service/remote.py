"""The trainer's stand-in for an inference copy that lives in remote inference services."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from typing_extensions import override

from shared.model.remote import RemoteInferenceModel
from shared.weights.served import ServedCasts
from trainer_service.publisher import Publisher
from trainer_service.sync_errors import SyncFailedError, WriterFencedError

logger = logging.getLogger(__name__)


class Syncs:
    """What the trainer's syncs do around its runs.

    Until the training loop has resumed its checkpoint and starts pushing (`started`), a sync
    sends nothing: the first push is the resumed weights, never the app's initial ones (a
    trainer that syncs in `on_training_models_attached`, harmless in PAMIQ, would otherwise
    serve untrained weights over trained ones at every restart). While a run is `holding`, a
    sync that fails is kept for the runner instead of raised into the trainer: PAMIQ's sync
    never fails, so a `sync()` inside `train()` lets the run go on and `teardown` keep its
    optimizer state, and the services it missed are caught up later. A fenced writer is
    raised at once. The run also learns which models sent anything: a model class whose own
    `sync_impl` does not call TorchTrainingModel's sends nothing across machines."""

    def __init__(self, started: bool = True) -> None:
        self.started = started
        self._run: HeldRun | None = None

    @contextmanager
    def holding(self) -> Iterator[HeldRun]:
        """Keep the syncs that fail meanwhile, instead of raising them, and the models sent."""
        self._run = HeldRun()
        try:
            yield self._run
        finally:
            self._run = None

    def sending(self, model: str) -> None:
        """Model `model` is being sent."""
        if self._run is not None:
            self._run.sent.add(model)

    def failed(self, error: SyncFailedError) -> None:
        """A sync failed: keep `error` while holding, else raise it."""
        if self._run is None or isinstance(error, WriterFencedError):
            raise error
        self._run.failed.append(error)


@dataclass
class HeldRun:
    """What the syncs of one run did: the failures kept, the models sent."""

    failed: list[SyncFailedError] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)


class PublishedInferenceModel(RemoteInferenceModel):
    """`sync()` of its TrainingModel streams the weights through the publisher, converted to
    the dtype they are served in (`served_dtype`; None: as trained), as `syncs` allows."""

    def __init__(
        self,
        name: str,
        publisher: Publisher,
        served_dtype: torch.dtype | None = None,
        syncs: Syncs | None = None,
    ) -> None:
        self.name = name
        self._publisher = publisher
        self._casts = ServedCasts(served_dtype)
        self._syncs = Syncs() if syncs is None else syncs

    @property
    def version(self) -> int:
        """The last version pushed (0: none yet); services that lag serve an older one."""
        return self._publisher.version(self.name)

    @override
    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        if not self._syncs.started:
            logger.debug("model %s: a sync before the trainer started sends nothing", self.name)
            return
        self._syncs.sending(self.name)
        served = self._casts.state(weights)
        # The converted tensors are this push's own: kept as they are for later deltas.
        owned = [name for name, tensor in served.items() if tensor is not weights[name]]
        try:
            self._publisher.publish(self.name, served, owned=owned)
        except SyncFailedError as error:
            self._syncs.failed(error)


class PublishedByRankZero(RemoteInferenceModel):
    """The inference copy as data-parallel ranks other than 0 see it.

    Rank 0 holds bit-identical weights (see distributed.py) and pushes them; this rank's sync
    has nothing left to send."""

    def __init__(self, name: str) -> None:
        self.name = name

    @override
    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        del weights  # rank 0 pushes the same weights
