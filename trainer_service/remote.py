"""The trainer's stand-in for an inference copy that lives in remote inference services."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from typing_extensions import override

from shared.model.remote import RemoteInferenceModel
from shared.weights.served import served_state
from trainer_service.publisher import Publisher


class PublishedInferenceModel(RemoteInferenceModel):
    """`sync()` of its TrainingModel streams the weights through the publisher, converted to
    the dtype they are served in (`served_dtype`; None: as trained)."""

    def __init__(
        self, name: str, publisher: Publisher, served_dtype: torch.dtype | None = None
    ) -> None:
        self.name = name
        self._publisher = publisher
        self._served_dtype = served_dtype

    @property
    def version(self) -> int:
        """The version the inference services serve since the last sync (0: none yet)."""
        return self._publisher.version(self.name)

    @override
    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        served = served_state(weights, self._served_dtype)
        # The converted tensors are this push's own: kept as they are for later deltas.
        owned = [name for name, tensor in served.items() if tensor is not weights[name]]
        self._publisher.publish(self.name, served, owned=owned)


class PublishedByRankZero(RemoteInferenceModel):
    """The inference copy as data-parallel ranks other than 0 see it.

    Rank 0 holds bit-identical weights (see distributed.py) and pushes them; this rank's sync
    has nothing left to send."""

    def __init__(self, name: str) -> None:
        self.name = name

    @override
    def publish(self, weights: Mapping[str, torch.Tensor]) -> None:
        del weights  # rank 0 pushes the same weights
