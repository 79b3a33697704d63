"""The trainer's fast path for batches that repeat the agent's layout (layouts.py)."""

from __future__ import annotations

import torch

from shared.app import TensorSpec
from shared.data.batch import BatchSchema, column_pieces, decode_columns
from shared.data.remote.wire import batch_layout, batch_message, padded_varint, parse_batch
from shared.weights.digest import byte_view
from trainer_service.experience.layouts import learn

SCHEMA = BatchSchema.of(
    "steps",
    [
        TensorSpec("x", "FP32", (2,)),
        TensorSpec("h", "BF16", (3,)),
        TensorSpec("id", "INT64", ()),
    ],
)
# The agent's order, which need not be the buffer's.
TENSORS = [("id", "I64", (), 8), ("x", "F32", (2,), 8), ("h", "BF16", (3,), 6)]
COUNT = 3
LAYOUT = batch_layout("steps", "agent", TENSORS, COUNT)


def columns(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "id": torch.arange(seed, seed + COUNT),
        "x": torch.randn(COUNT, 2, generator=generator),
        "h": torch.randn(COUNT, 3, generator=generator).to(torch.bfloat16),
    }


def message(sequence: int, seed: int) -> bytes:
    out = bytearray(LAYOUT.size)
    out[: len(LAYOUT.head)] = LAYOUT.head
    out[LAYOUT.sequence_at : LAYOUT.sequence_at + 10] = padded_varint(sequence)
    for name, column in columns(seed).items():
        data = byte_view(column)
        out[LAYOUT.offsets[name] : LAYOUT.offsets[name] + len(data)] = data
    return bytes(out)


def test_a_layout_learnt_once_reads_later_batches_bit_exact_as_the_full_path_does() -> None:
    first = message(1, 0)
    known = learn(first, parse_batch(first), SCHEMA, 100)
    assert known is not None
    assert (known.buffer, known.collector_id, known.count) == ("steps", "agent", COUNT)
    later = message(2**64 - 1, 7)
    assert known.sequence(later) == parse_batch(later).sequence == 2**64 - 1
    block = known.block(later)
    full = decode_columns(parse_batch(later).payload, SCHEMA)
    assert list(block.columns) == ["x", "h", "id"]  # the buffer's order
    for name, column in full.items():
        assert block.columns[name].dtype == column.dtype
        assert torch.equal(block.columns[name], column)
        assert block.columns[name].data_ptr() != column.data_ptr()  # a copy of its own
    assert known.payload_bytes == len(parse_batch(later).payload)


def test_a_message_that_differs_from_the_layout_before_its_data_is_not_read_from_it() -> None:
    first = message(1, 0)
    known = learn(first, parse_batch(first), SCHEMA, 100)
    assert known is not None
    assert known.sequence(first[:-1]) is None  # another size
    header = first.replace(b'"x":{"dtype":"F32"', b'"x":{"dtype":"F16"')
    assert header != first and known.sequence(header) is None
    at = LAYOUT.sequence_at
    unpadded = first[:at] + b"\x05" + b"\x00" * 9 + first[at + 10 :]  # a varint, then a field 0
    assert known.sequence(unpadded) is None
    other = batch_layout("steps", "agent-2", TENSORS, COUNT)  # another collector id
    assert known.sequence(other.head + b"\x00" * (other.size - len(other.head))) is None


def test_a_batch_not_laid_out_as_the_agent_lays_out_full_batches_teaches_no_layout() -> None:
    # A batch sent early (`frame`): the sequence number is not padded.
    early = batch_message("steps", 3, "agent", column_pieces(columns(0)))
    assert learn(early, parse_batch(early), SCHEMA, 100) is None
