"""The RemoteDataCollector's pieces without a network: samples copied into slabs (one copy, the
caller's memory free at once, slabs reused once framed or acknowledged), a whole slab sent as its
own message, and Batch messages read by hand on the trainer exactly as protobuf reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data.batch import BatchSchema, Column, decode_columns
from shared.data.remote.pending import Pending
from shared.data.remote.samples import layout_of
from shared.data.remote.wire import PAYLOAD_TAG, batch_message, padded_varint, parse_batch
from shared.dtypes import BY_OIP
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


def filled(pending: Pending, count: int) -> None:
    """`count` good samples in, ids 0 .. count - 1: the layout's fast path in use, a slab full
    and the next one open."""
    for i in range(count):
        pending.put(sample(i), 0.0)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            {"x": torch.zeros(3, dtype=torch.float64), "id": torch.tensor(0)},
            "tensor 'x' is torch.float64 [3], not torch.float32 [3]",
        ),
        (
            {"x": torch.zeros(3), "id": torch.tensor(0, dtype=torch.int32)},
            "tensor 'id' is torch.int32 [], not torch.int64 []",
        ),
        ({"x": torch.zeros(4), "id": torch.tensor(0)}, "tensor 'x' is torch.float32 [4]"),
        ({"x": torch.zeros(1, 3), "id": torch.tensor(0)}, "tensor 'x' is torch.float32 [1, 3]"),
        ({"x": torch.zeros(3), "id": torch.tensor([0])}, "tensor 'id' is torch.int64 [1]"),
        ({"x": torch.zeros(3)}, "sample names ['x'] differ from ['id', 'x']"),
        ({"x": torch.zeros(3), "idx": torch.tensor(0)}, "sample names ['idx', 'x'] differ"),
        (
            {"x": torch.zeros(3), "id": torch.tensor(0), "more": torch.tensor(0)},
            "sample names ['id', 'more', 'x'] differ",
        ),
        (
            {"x": torch.zeros(3, device="meta"), "id": torch.tensor(0)},
            "tensor 'x' cannot be copied",
        ),
    ],
)
def test_after_good_samples_one_unlike_the_layout_is_still_refused_and_stores_nothing(
    data: dict[str, object], why: str
) -> None:
    pending = Pending(layout_of(sample(0)), 4)
    filled(pending, 6)
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        pending.put(data, 0.0)
    assert pending.count == 6
    pending.put(sample(6), 0.0)
    first, _, _ = pending.take(4)
    rest, _, _ = pending.take(4)
    assert first["id"].tolist() == [0, 1, 2, 3] and rest["id"].tolist() == [4, 5, 6]
    assert rest["x"][:, 0].tolist() == [4.0, 5.0, 6.0]  # no row of the refused one in between


def test_a_default_device_does_not_change_what_the_fast_path_takes() -> None:
    with torch.device("meta"):  # the process's default device while the collector starts
        pending = Pending(layout_of(sample(0)), 4)
    filled(pending, 2)
    with pytest.raises(ValueError, match="tensor 'x' cannot be copied"):
        pending.put({"x": torch.zeros(3, device="meta"), "id": torch.tensor(2)}, 0.0)
    assert pending.take(4)[0]["id"].tolist() == [0, 1]


def lazily_negated_detached() -> torch.Tensor:
    value = torch._neg_view(torch.tensor([0.0, 1.0, 2.0])).detach()
    assert value.is_neg() and not value._is_view()  # the bit is kept by detach, not a view
    return value


def made_in_inference_mode() -> torch.Tensor:
    with torch.inference_mode():
        return torch.tensor([0.0, -1.0, -2.0])


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor([0.0, 9.0, -1.0, 9.0, -2.0, 9.0])[::2],  # not contiguous
        torch._neg_view(torch.tensor([0.0, 1.0, 2.0])),  # lazily negated
        lazily_negated_detached(),
        torch.tensor([-0.0, 1.0, 2.0]).neg(),  # negated for real
        made_in_inference_mode(),
        np.array([0.0, -1.0, -2.0], dtype=np.float32),
        torch.tensor([[0.0, -1.0, -2.0]])[0],  # a view, contiguous
    ],
)
def test_after_good_samples_a_tensor_is_still_copied_as_its_values(value: object) -> None:
    pending = Pending({"x": (torch.float32, torch.Size([3]))}, 2)
    for i in range(3):
        pending.put({"x": torch.full((3,), float(i))}, 0.0)
    pending.put({"x": value}, 0.0)
    pending.take(2)
    assert pending.take(2)[0]["x"].tolist() == [[2.0, 2.0, 2.0], [0.0, -1.0, -2.0]]


def test_after_good_samples_a_lazily_conjugated_tensor_is_still_copied_as_its_values() -> None:
    plain = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    pending = Pending(layout_of({"z": plain}), 2)
    pending.put({"z": plain}, 0.0)
    pending.put({"z": plain.conj()}, 0.0)
    pending.put({"z": plain.conj().detach()}, 0.0)
    assert pending.take(2)[0]["z"].tolist() == [[1 + 2j, 3 - 4j], [1 - 2j, 3 + 4j]]
    assert pending.take(2)[0]["z"].tolist() == [[1 - 2j, 3 + 4j]]


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


def schema_of(layout: dict[str, tuple[torch.dtype, torch.Size]]) -> BatchSchema:
    return BatchSchema(
        "steps",
        tuple(
            Column(name, datatype(dtype), tuple(shape)) for name, (dtype, shape) in layout.items()
        ),
    )


def datatype(dtype: torch.dtype) -> str:
    return next(oip for oip, d in BY_OIP.items() if d.torch_dtype == dtype)


def test_a_whole_slab_is_its_batch_message_read_bit_exact_by_the_trainer() -> None:
    generator = torch.Generator().manual_seed(3)
    obs = torch.randn(4, 5, generator=generator)
    obs[0, 0] = float("nan")  # compared as bits
    sent = [
        {"obs": obs[i], "id": torch.tensor(i), "flag": torch.tensor([i % 2 == 0])} for i in range(4)
    ]
    pending = Pending(layout_of(sent[0]), 4, "steps", "abc")
    reused = obs[0].clone()
    pending.put({"obs": reused, "id": sent[0]["id"], "flag": sent[0]["flag"]}, 0.0)
    reused.fill_(9.0)  # the caller reuses its tensor at once: the slab holds its own copy
    for data in sent[1:]:
        pending.put(data, 0.0)
    assert pending.take_whole(3, None) is None  # the trainer takes fewer samples a batch
    assert pending.take_whole(4, pending.payload_bytes - 1) is None  # or fewer bytes
    slab = pending.take_whole(4, pending.payload_bytes)
    assert slab is not None and pending.count == 0
    message = slab.seal(2**40 + 3)

    parsed = pb.Batch.FromString(message)  # protobuf reads it as any Batch
    assert (parsed.buffer, parsed.sequence, parsed.collector_id) == ("steps", 2**40 + 3, "abc")
    read = parse_batch(message)  # and so does the trainer, by hand
    assert (read.buffer, read.sequence, read.collector_id) == ("steps", 2**40 + 3, "abc")
    assert bytes(read.payload) == parsed.payload and len(read.payload) == pending.payload_bytes
    columns = decode_columns(read.payload, schema_of(pending.layout))
    expected = {name: torch.stack([s[name] for s in sent]) for name in sent[0]}
    for name, column in columns.items():
        assert column.dtype == expected[name].dtype
        assert column.numpy().tobytes() == expected[name].numpy().tobytes(), name
        # Each tensor's data lies 8-byte aligned within the message.
        assert (column.data_ptr() - np.frombuffer(message, np.uint8).ctypes.data) % 8 == 0


def test_a_sealed_slab_is_filled_again_only_once_nothing_refers_to_its_message() -> None:
    pending = Pending(layout_of(sample(0)), 2, "steps", "abc")
    for i in range(2):
        pending.put(sample(i), 0.0)
    slab = pending.take_whole(2, None)
    assert slab is not None
    message = slab.seal(1)
    before = bytearray(message)  # a copy (bytes() of bytes is the same object)
    pending.reuse(slab)  # acknowledged, but the message is still referred to (queued, say)
    for i in range(2, 4):
        pending.put(sample(i), 1.0)
    unchanged = message == before  # a new slab took those samples
    assert unchanged
    other = pending.take_whole(2, None)
    assert other is not None and other is not slab
    del message
    pending.reuse(slab)  # given back again, nothing referring to its message now
    pending.put(sample(4), 2.0)
    assert slab.columns["id"][0].item() == 4  # filled again
    assert pending.take(1)[0]["id"].tolist() == [4]


def test_a_slab_given_back_while_its_message_is_referred_to_waits_spare_until_it_is_not() -> None:
    pending = Pending(layout_of(sample(0)), 2, "steps", "abc")
    filled(pending, 2)
    slab = pending.take_whole(2, None)
    assert slab is not None
    message = slab.seal(1)  # still referred to (gRPC's last request, say) when acknowledged
    pending.reuse(slab)
    filled(pending, 2)  # a slab of its own: the message must not change
    other = pending.take_whole(2, None)
    assert other is not None and other is not slab
    del message  # now nothing refers to it: the next slab filled is that one, no new memory
    pending.put(sample(7), 0.0)
    assert slab.columns["id"][0].item() == 7


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor([0.0, 9.0, -1.0, 9.0, -2.0, 9.0])[::2],  # not contiguous
        torch._neg_view(torch.tensor([0.0, 1.0, 2.0])),  # lazily negated
        np.array([0.0, -1.0, -2.0], dtype=np.float32),
        # read-only: a served request's input, recorded (torch warns where given one)
        np.frombuffer(np.array([0.0, -1.0, -2.0], dtype=np.float32).tobytes(), np.float32),
        torch.tensor([0.0, -1.0, -2.0], requires_grad=True),
        torch.nn.Parameter(torch.tensor([0.0, -1.0, -2.0])),
    ],
)
def test_any_tensor_like_value_is_copied_as_its_values(value: object) -> None:
    pending = Pending({"x": (torch.float32, torch.Size([3]))}, 2)
    pending.put({"x": value}, 0.0)
    pending.put({"x": torch.tensor([7.0, 8.0, 9.0])}, 0.0)
    assert pending.take(2)[0]["x"].tolist() == [[0.0, -1.0, -2.0], [7.0, 8.0, 9.0]]


def test_a_lazily_conjugated_complex_tensor_is_copied_as_its_values() -> None:
    value = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()
    assert value.is_conj()
    pending = Pending(layout_of({"z": value}), 1)
    pending.put({"z": value}, 0.0)
    assert pending.take(1)[0]["z"][0].tolist() == [1 - 2j, 3 + 4j]


def test_a_dtype_no_batch_can_carry_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="cannot travel in a batch"):
        Pending(layout_of({"z": torch.zeros(2, dtype=torch.complex128)}), 4)


def test_padded_varints_read_as_their_value() -> None:
    for value in (0, 1, 300, 2**63 - 1, 2**64 - 1):
        message = b"\x10" + padded_varint(value)
        assert len(padded_varint(value)) == 10
        assert pb.Batch.FromString(message).sequence == value
        assert parse_batch(message).sequence == value
