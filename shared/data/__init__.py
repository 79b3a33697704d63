"""PAMIQ-Core's data API: buffers, their collectors and users, by name.

The torch-free parts import nothing heavy; saving a buffer imports torch on first use.
"""

from shared.data.buffer import DataBuffer
from shared.data.container import DataCollectorsDict, DataUsersDict
from shared.data.impls import (
    DictRandomReplacementBuffer,
    DictSequentialBuffer,
    RandomReplacementBuffer,
    SequentialBuffer,
)
from shared.data.interface import DataCollector, DataUser

__all__ = [
    "DataBuffer",
    "DataCollector",
    "DataCollectorsDict",
    "DataUser",
    "DataUsersDict",
    "DictRandomReplacementBuffer",
    "DictSequentialBuffer",
    "RandomReplacementBuffer",
    "SequentialBuffer",
]
