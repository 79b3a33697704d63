"""The model interface, as PAMIQ-Core defines it: an inference model, and the training model
that creates it and syncs its weights into it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from shared.state import PersistentStateMixin


class InferenceModel(ABC):
    """A model the inference side calls; `model(...)` forwards to `infer(...)`."""

    @abstractmethod
    def infer(self, *args: Any, **kwds: Any) -> Any:
        """Run inference."""

    def __call__(self, *args: Any, **kwds: Any) -> Any:
        return self.infer(*args, **kwds)


T = TypeVar("T", bound=InferenceModel)


class TrainingModel(ABC, PersistentStateMixin, Generic[T]):
    """A trainable model that owns the creation and the syncing of its inference copy.

    Args:
        has_inference_model: whether the model has an inference copy at all.
        inference_thread_only: the model is used for inference only (never trained, never
            synced); its inference copy shares the training model's weights.
    """

    _inference_model: InferenceModel | None = None

    def __init__(self, has_inference_model: bool = True, inference_thread_only: bool = False):
        if not has_inference_model and inference_thread_only:
            raise ValueError(
                "inference_thread_only=True needs has_inference_model=True: a model used only "
                "for inference must have an inference copy"
            )
        self.has_inference_model = has_inference_model
        self.inference_thread_only = inference_thread_only

    @property
    def inference_model(self) -> T:
        """The inference copy, created on first access."""
        if not self.has_inference_model:
            raise RuntimeError(
                f"{type(self).__name__} was created with has_inference_model=False: it has no "
                "inference model"
            )
        if self._inference_model is None:
            self._inference_model = self._create_inference_model()
        return self._inference_model  # type: ignore[return-value]

    def attach_inference_model(self, model: InferenceModel) -> None:
        """Use `model` as the inference copy instead of creating the default one.

        The trainer service attaches a stand-in for a copy that lives in remote inference
        services, so no local copy is ever made.
        """
        if not self.has_inference_model:
            raise RuntimeError(
                f"{type(self).__name__} was created with has_inference_model=False: it cannot "
                "take an inference model"
            )
        self._inference_model = model

    @abstractmethod
    def _create_inference_model(self) -> T:
        """Create the inference copy."""

    @abstractmethod
    def forward(self, *args: Any, **kwds: Any) -> Any:
        """The training-side forward pass."""

    def __call__(self, *args: Any, **kwds: Any) -> Any:
        return self.forward(*args, **kwds)

    @property
    def _need_sync(self) -> bool:
        return self.has_inference_model and not self.inference_thread_only

    def sync(self) -> None:
        """Make the inference copy hold the training weights (no-op when nothing syncs)."""
        if self._need_sync:
            self.sync_impl(self.inference_model)

    @abstractmethod
    def sync_impl(self, inference_model: T) -> None:
        """Copy or transfer the training weights into `inference_model`."""
