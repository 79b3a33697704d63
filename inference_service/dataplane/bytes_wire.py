"""The raw form of OIP BYTES tensors (`raw_input_contents` / `raw_output_contents`): each
element is its 4-byte little-endian length followed by its bytes."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from shared.errors import InvalidInputError

_LENGTH = struct.Struct("<I")
LENGTH_BYTES = _LENGTH.size  # the length prefix: the fewest bytes a raw element takes


def pack_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements in raw form: each one's 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def unpack_bytes(label: str, data: bytes, count: int) -> list[bytes]:
    """`count` BYTES elements from their raw form; InvalidInputError, its message starting with
    `label` ("input 'x'"), if it does not parse."""
    elements: list[bytes] = []
    position = 0
    while position < len(data):
        if position + LENGTH_BYTES > len(data):
            raise InvalidInputError(f"{label}: BYTES element {len(elements)} is cut off")
        (size,) = _LENGTH.unpack_from(data, position)
        position += LENGTH_BYTES
        if position + size > len(data):
            raise InvalidInputError(
                f"{label}: BYTES element {len(elements)} says {size} bytes but only "
                f"{len(data) - position} follow"
            )
        elements.append(bytes(data[position : position + size]))
        position += size
    if len(elements) != count:
        raise InvalidInputError(
            f"{label}: {len(elements)} BYTES elements but the shape needs {count}"
        )
    return elements
