"""Headers built to break Python's JSON parser are refused as malformed pushes naming the header,
never as the ValueError or RecursionError that json raises (which would reach a client as
INTERNAL); a header over the limit is refused before any of it is parsed."""

from __future__ import annotations

import pytest

from shared.errors import MalformedPushError, ResourceLimitError
from shared.weights.layout import TensorEntry, TensorLayout
from shared.weights.reader import PayloadReader

LAYOUT = {"w": TensorLayout("F32", (2,))}


class Discard:
    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        pass


def reader_of(body: bytes, max_header_bytes: int = 16 << 20) -> tuple[PayloadReader, bytes]:
    blob = len(body).to_bytes(8, "little") + body + bytes(8)
    return PayloadReader(len(blob), LAYOUT, Discard(), max_header_bytes), blob


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
            "safetensors header holds an integer of more than .* digits",
        ),
        (b'{"w": [' + b"1" * 4301 + b"]}", "safetensors header holds an integer of more than"),
        (b"[" * 100_000, "safetensors header nests arrays or objects too deeply to be parsed"),
        (b'{"a":' * 100_000, "safetensors header nests arrays or objects too deeply to be parsed"),
        (b"[" * 100_000 + b"]" * 100_000, "safetensors header nests arrays or objects too deeply"),
    ],
    ids=["5000-digit shape", "4301-digit value", "open arrays", "open objects", "closed arrays"],
)
def test_a_header_json_cannot_parse_is_a_malformed_push(body: bytes, message: str) -> None:
    reader, blob = reader_of(body)
    with pytest.raises(MalformedPushError, match=message):
        reader.feed(blob)


def test_a_long_integer_within_the_limit_is_checked_like_any_other() -> None:
    body = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 4000 + b'], "data_offsets": [0, 8]}}'
    reader, blob = reader_of(body)
    with pytest.raises(MalformedPushError, match=r"tensor 'w': shape \[9999"):
        reader.feed(blob)


def test_a_deep_header_over_the_size_limit_is_refused_before_it_is_parsed() -> None:
    reader, blob = reader_of(b"[" * 100_000, max_header_bytes=1 << 16)
    with pytest.raises(ResourceLimitError, match="safetensors header of 100000 bytes exceeds"):
        reader.feed(blob[:8])  # the length alone
