"""The buffers PAMIQ-Core ships: sequential (oldest out) and random replacement."""

from shared.data.impls.random_replacement import (
    DictRandomReplacementBuffer,
    RandomReplacementBuffer,
)
from shared.data.impls.sequential import DictSequentialBuffer, SequentialBuffer

__all__ = [
    "DictRandomReplacementBuffer",
    "DictSequentialBuffer",
    "RandomReplacementBuffer",
    "SequentialBuffer",
]
