"""The model interface, as PAMIQ-Core defines it.

An `InferenceModel` is what the inference side calls. A `TrainingModel` is what a trainer trains;
it creates its inference copy and syncs the trained weights into it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar, cast

from shared.state import PersistentStateMixin


class InferenceModel(ABC):
    """A model the inference side calls; `model(...)` is `model.infer(...)`."""

    @abstractmethod
    def infer(self, *args: Any, **kwds: Any) -> Any:
        """Run inference.

        Args:
            *args: The model's positional inputs.
            **kwds: The model's keyword inputs.

        Returns:
            The model's output.
        """

    def __call__(self, *args: Any, **kwds: Any) -> Any:
        """Same as `infer(*args, **kwds)`."""
        return self.infer(*args, **kwds)


T = TypeVar("T", bound=InferenceModel)


class TrainingModel(ABC, PersistentStateMixin, Generic[T]):
    """A trainable model that creates its inference copy and syncs its weights into it.

    Subclasses implement `_create_inference_model`, `forward` and `sync_impl`. A trainer calls
    `sync()` after each training run; it calls `sync_impl(self.inference_model)` only when the
    model has an inference copy that is not shared with the training side.

    Args:
        has_inference_model: Whether the model has an inference copy at all (False: a model
            that only trainers use).
        inference_thread_only: The model is used for inference only: never trained, never
            synced, and its inference copy may share the training model's weights.

    Raises:
        ValueError: `inference_thread_only` is True while `has_inference_model` is False.
    """

    # Typed InferenceModel, not T: attach_inference_model accepts any InferenceModel.
    _inference_model: InferenceModel | None = None

    def __init__(self, has_inference_model: bool = True, inference_thread_only: bool = False):
        if not has_inference_model and inference_thread_only:
            raise ValueError(
                "inference_thread_only=True needs has_inference_model=True: a model used only "
                "for inference must have an inference model"
            )
        self.has_inference_model = has_inference_model
        self.inference_thread_only = inference_thread_only

    @property
    def inference_model(self) -> T:
        """The inference copy, created by `_create_inference_model` on first access.

        If `attach_inference_model` was called, this is the attached model.

        Raises:
            RuntimeError: The model was created with `has_inference_model=False`.
        """
        if not self.has_inference_model:
            raise RuntimeError(
                f"{type(self).__name__} was created with has_inference_model=False, so it has "
                "no inference model; pass has_inference_model=True to get one"
            )
        if self._inference_model is None:
            self._inference_model = self._create_inference_model()
        return cast(T, self._inference_model)

    def attach_inference_model(self, model: InferenceModel) -> None:
        """Use `model` as the inference copy instead of creating the default one.

        Not in PAMIQ-Core. The trainer service attaches a stand-in for a copy that lives in
        remote inference services (a `RemoteInferenceModel`), so no local copy is ever made.
        `sync_impl` then receives `model`.

        Args:
            model: The inference model to use from now on.

        Raises:
            RuntimeError: The model was created with `has_inference_model=False`.
        """
        if not self.has_inference_model:
            raise RuntimeError(
                f"{type(self).__name__} was created with has_inference_model=False, so it "
                "cannot take an inference model; pass has_inference_model=True"
            )
        self._inference_model = model

    @abstractmethod
    def _create_inference_model(self) -> T:
        """Create the inference copy (called once, on the first access to `inference_model`).

        Returns:
            The new inference model.
        """

    @abstractmethod
    def forward(self, *args: Any, **kwds: Any) -> Any:
        """The training-side forward pass.

        Args:
            *args: The model's positional inputs.
            **kwds: The model's keyword inputs.

        Returns:
            The model's output.
        """

    def __call__(self, *args: Any, **kwds: Any) -> Any:
        """Same as `forward(*args, **kwds)`."""
        return self.forward(*args, **kwds)

    @property
    def _need_sync(self) -> bool:
        return self.has_inference_model and not self.inference_thread_only

    def sync(self) -> None:
        """Make the inference copy hold the training weights.

        A no-op when the model has no inference copy or is inference-thread-only.
        """
        if self._need_sync:
            self.sync_impl(self.inference_model)

    @abstractmethod
    def sync_impl(self, inference_model: T) -> None:
        """Copy or transfer the training weights into `inference_model`.

        Args:
            inference_model: The model's inference copy.
        """
