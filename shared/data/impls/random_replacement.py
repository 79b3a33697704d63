"""PAMIQ-Core's RandomReplacementBuffer: once full, a new sample replaces a random one, or not.

A full buffer replaces a uniformly chosen sample with probability `replace_probability` and
drops the new sample otherwise, so old samples survive longer than in a sequential buffer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

from typing_extensions import override

from shared.data.block import SampleBlock
from shared.data.buffer import DataBuffer
from shared.data.impls.keyed import KeyedBuffer
from shared.data.persist import load_samples, save_samples, state_file

T = TypeVar("T")

EULER_GAMMA = 0.5772156649015329


class RandomReplacementBuffer(DataBuffer[T, list[T]], Generic[T]):
    """Keeps at most `max_size` samples; once full, each new one may replace a random one."""

    def __init__(
        self,
        max_size: int,
        replace_probability: float | None = None,
        expected_survival_length: int | None = None,
    ) -> None:
        """Initialize the buffer.

        Args:
            max_size: The most samples kept.
            replace_probability: The chance that a sample added to a full buffer replaces
                one (else it is dropped), in [0, 1]. Default 1.0, or computed from
                `expected_survival_length`.
            expected_survival_length: How many additions a sample should survive on
                average; sets `replace_probability`. Give one of the two at most.

        Raises:
            ValueError: Both are given, or the probability is outside [0, 1].
        """
        if replace_probability is None:
            if expected_survival_length is None:
                replace_probability = 1.0
            else:
                replace_probability = (
                    self.compute_replace_probability_from_expected_survival_length(
                        max_size, expected_survival_length
                    )
                )
        elif expected_survival_length is not None:
            raise ValueError(
                "Cannot specify both replace_probability and expected_survival_length. "
                "Please specify only one of them."
            )
        if not (1.0 >= replace_probability >= 0.0):
            raise ValueError("replace_probability must be between 0.0 and 1.0 inclusive")
        # Of the samples queued between two updates, about max_size / p can still land in a
        # full buffer. PAMIQ divides by p unguarded; with p = 0 none can, so max_size does.
        queue = max_size if replace_probability == 0 else int(max_size / replace_probability)
        super().__init__(queue)
        self._max_size = max_size
        self._data_list: list[T] = []
        self._replace_probability = replace_probability

    @staticmethod
    def compute_replace_probability_from_expected_survival_length(
        max_size: int, survival_length: int
    ) -> float:
        """The replace probability under which a sample survives about `survival_length`
        additions to a full buffer of `max_size` (clamped to [0, 1]).

        Args:
            max_size: The buffer's size.
            survival_length: The additions a sample should survive on average.

        Returns:
            The probability.
        """
        p = max_size / survival_length * (math.log(max_size) + EULER_GAMMA)
        return min(max(p, 0.0), 1.0)

    @property
    def max_size(self) -> int:
        """The most samples kept."""
        return self._max_size

    @property
    def replace_probability(self) -> float:
        """The chance that a sample added to a full buffer replaces one."""
        return self._replace_probability

    @property
    def is_full(self) -> bool:
        """Whether the buffer holds `max_size` samples."""
        return len(self._data_list) >= self._max_size

    @override
    def add(self, data: T) -> None:
        if self.is_full:
            if random.random() > self._replace_probability:
                return
            self._data_list[random.randint(0, self._max_size - 1)] = data
        else:
            self._data_list.append(data)

    @override
    def add_batch(self, block: SampleBlock) -> None:
        """Add the samples of `block` as `add` would one by one; each one kept is a copy of its
        own (a view would keep the whole block alive for as long as that one sample)."""
        for index in range(block.count):
            if self.is_full:
                if random.random() > self._replace_probability:
                    continue
                slot = random.randint(0, self._max_size - 1)
                self._data_list[slot] = block.sample(index)  # type: ignore[assignment]
            else:
                self._data_list.append(block.sample(index))  # type: ignore[arg-type]

    @override
    def get_data(self) -> list[T]:
        """The samples (a new list)."""
        return self._data_list.copy()

    @override
    def __len__(self) -> int:
        return len(self._data_list)

    @override
    def save_state(self, path: Path) -> None:
        """Save the samples to `<path>.safetensors`."""
        save_samples(state_file(path), self._data_list)

    @override
    def load_state(self, path: Path) -> None:
        """Load the samples `save_state` saved (the first `max_size` of them)."""
        self._data_list = load_samples(state_file(path))[: self._max_size]


class DictRandomReplacementBuffer(KeyedBuffer[T], Generic[T]):
    """A RandomReplacementBuffer of mappings with fixed keys; `get_data()` gives a list per key."""

    def __init__(
        self,
        keys: Iterable[str],
        max_size: int,
        replace_probability: float | None = None,
        expected_survival_length: int | None = None,
    ) -> None:
        """Initialize the buffer.

        Args:
            keys: The keys every sample must have.
            max_size: As RandomReplacementBuffer's, and so are the others.
        """
        self._random = RandomReplacementBuffer[dict[str, T]](
            max_size, replace_probability, expected_survival_length
        )
        super().__init__(keys, self._random)

    @property
    def max_size(self) -> int:
        """The most samples kept."""
        return self._random.max_size
