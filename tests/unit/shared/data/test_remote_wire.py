"""The RemoteDataCollector's pieces without a network: samples copied into slabs (one copy, the
caller's memory free at once, slabs reused once framed), and Batch messages read by hand on the
trainer exactly as protobuf reads them."""

from __future__ import annotations

import pytest
import torch

from shared.data.remote.pending import Pending
from shared.data.remote.samples import layout_of
from shared.data.remote.wire import PAYLOAD_TAG, batch_message, parse_batch
from shared.errors import MalformedBatchError
from shared.gen.experience.v1 import experience_pb2 as pb


def sample(i: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((3,), float(i)), "id": torch.tensor(i)}


def test_samples_are_copied_into_rows_and_taken_stacked() -> None:
    pending = Pending(layout_of(sample(0)), 4)
    x = torch.zeros(3, requires_grad=True)
    assert not pending.put({"x": x, "id": torch.tensor(0)}, 0.0)
    with torch.no_grad():
        x.fill_(9.0)  # the caller reuses its memory at once
    for i in range(1, 6):
        pending.put(sample(i), float(i))
    assert pending.count == 6 and pending.oldest == 0.0
    columns, count, emptied = pending.take(10)  # one slab's rows at most
    assert count == 4 and emptied is not None
    assert columns["x"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert columns["id"].tolist() == [0, 1, 2, 3]
    assert pending.count == 2 and pending.oldest == 4.0


def test_a_slab_is_filled_again_only_once_given_back() -> None:
    pending = Pending(layout_of(sample(0)), 2)
    for i in range(2):
        pending.put(sample(i), 0.0)
    columns, _, emptied = pending.take(2)
    pending.put(sample(2), 1.0)  # a new slab: the taken rows are still being framed
    assert columns["id"].tolist() == [0, 1]
    pending.reuse(emptied)
    pending.put(sample(3), 1.0)
    pending.put(sample(4), 2.0)  # fills the slab given back
    assert pending.take(2)[0]["id"].tolist() == [2, 3]
    assert pending.take(2)[0]["id"].tolist() == [4]
    assert columns["id"].tolist() == [4, 1]  # the reused memory


def test_dropping_the_oldest_keeps_the_rest_in_order() -> None:
    pending = Pending(layout_of(sample(0)), 2)
    for i in range(5):
        pending.put(sample(i), float(i))
    pending.drop_oldest()
    pending.drop_oldest()
    assert pending.count == 3
    assert pending.take(5)[0]["id"].tolist() == [2, 3]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"x": torch.zeros(4), "id": torch.tensor(0)}, "tensor 'x' is torch.float32 [4]"),
        ({"x": torch.zeros(3, dtype=torch.float64), "id": 0}, "tensor 'x' is torch.float64"),
        ({"x": torch.zeros(3)}, "sample names ['x'] differ"),
        ({"x": torch.zeros(3), "idx": 0}, "sample names ['idx', 'x'] differ"),
    ],
)
def test_a_sample_unlike_the_layout_is_refused_and_stores_nothing(
    data: dict[str, object], why: str
) -> None:
    pending = Pending(layout_of(sample(0)), 2)
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        pending.put(data, 0.0)
    assert pending.count == 0
    pending.put(sample(1), 0.0)
    assert pending.take(2)[0]["id"].tolist() == [1]


def test_a_dtype_numpy_lacks_is_copied_by_torch() -> None:
    data = {"x": torch.ones(2, dtype=torch.bfloat16)}
    pending = Pending(layout_of(data), 2)
    pending.put(data, 0.0)
    pending.put({"x": torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)}, 0.0)
    assert pending.take(2)[0]["x"].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_a_batch_reads_as_protobuf_reads_it() -> None:
    message = batch_message("steps", 7, "abc", [b"\x01\x02", b"\x03"])
    assert pb.Batch.FromString(message) == pb.Batch(
        buffer="steps", sequence=7, collector_id="abc", payload=b"\x01\x02\x03"
    )
    read = parse_batch(message)
    assert (read.buffer, read.sequence, read.collector_id, bytes(read.payload)) == (
        "steps",
        7,
        "abc",
        b"\x01\x02\x03",
    )
    # Any order, unknown fields skipped, the last of a repeated field wins, as protobuf does.
    other = pb.Batch(buffer="x", sequence=1).SerializeToString()
    unknown = b"\x28\x05" + b"\x35\x00\x00\x00\x00"  # field 5 varint, field 6 fixed32
    mixed = PAYLOAD_TAG + b"\x01\x09" + unknown + other + pb.Batch(sequence=2).SerializeToString()
    read = parse_batch(mixed)
    assert (read.buffer, read.sequence, bytes(read.payload)) == ("x", 2, b"\x09")
    assert parse_batch(b"").buffer == ""


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\x0a\x05ab", "field runs past its end"),
        (b"\x10", "truncated or overlong varint"),
        (b"\x1a\x80", "truncated or overlong varint"),
        (b"\x0b", "wire type 3"),
        (b"\x18\x01", "payload is not length-delimited"),
        (b"\x12\x01a", "sequence is not a varint"),
        (b"\x0a\x01\xff", "not UTF-8"),
        (b"\x08\x01", "buffer is not length-delimited"),
        (b"\x20\x01", "collector_id is not length-delimited"),
        (b"\x22\x01\xff", "collector_id is not UTF-8"),
        (b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "field runs past its end"),
        (b"\x31\x00", "last field runs past its end"),
    ],
)
def test_a_message_that_is_no_batch_is_refused(message: bytes, why: str) -> None:
    with pytest.raises(MalformedBatchError, match=why):
        parse_batch(message)
