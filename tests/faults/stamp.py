"""The weights the fault schedules push: the stamp model (tests/integration/apps.py), each of its
eight tensors filled with one small integer.

A state is its eight fill values. Its digest is computed exactly as the service does
(shared/weights/digest.py), and the served model's output is the mean of each tensor: with
integers below 128 and 2^15 elements per tensor every partial sum is an exact float32, so the
data plane answers the fill values themselves, bit for bit, whatever order it sums in.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

from shared.weights.digest import state_digest
from shared.weights.writer import Payload

APP = "tests.integration.apps:stamp"
MODEL = "stamp"
MEGABYTES = 1  # TEST_STAMP_MB: 8 tensors of 2^15 float32 each
PARTS = 8
ELEMENTS = MEGABYTES * (1 << 20) // 4 // PARTS
MAX_FILL = 127  # fill values stay in [0, MAX_FILL]: exact means (see above)
CHUNK_BYTES = 64 << 10  # 16 data messages per full push, so a push can be cut mid-payload

Fills = tuple[int, ...]
ZEROS: Fills = (0,) * PARTS


def names() -> list[str]:
    return [f"parts.{i}" for i in range(PARTS)]


def tensors(fills: Sequence[int], only: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `fills` (or of the parts `only` names)."""
    chosen = range(PARTS) if only is None else only
    return {f"parts.{i}": torch.full((ELEMENTS,), float(fills[i])) for i in chosen}


@functools.lru_cache(maxsize=4096)
def digest(fills: Fills) -> bytes:
    """The model digest of the state `fills`, as the service computes it."""
    return state_digest(tensors(fills))


def uniform(value: int) -> Fills:
    return (value,) * PARTS


def payload_chunks(fills: Fills, only: Sequence[int] | None = None) -> Iterator[bytes]:
    """The safetensors bytes of a push of `fills` (every part, or those `only` names)."""
    chosen = sorted(range(PARTS) if only is None else only)
    state = tensors(fills, chosen)
    yield from Payload.of([(f"parts.{i}", state[f"parts.{i}"]) for i in chosen]).chunks(CHUNK_BYTES)
