"""The streamed safetensors codec: what the writer emits, what the reader accepts and refuses."""

from __future__ import annotations

import json
import random

import pytest
import safetensors.torch
import torch

from shared.errors import MalformedPushError, ResourceLimitError
from shared.weights.digest import model_digest, state_digest, tensor_hash
from shared.weights.layout import TensorEntry, TensorLayout
from shared.weights.reader import PayloadReader
from shared.weights.writer import Payload


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "a.bias": torch.randn(17, generator=g).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "mask": torch.rand(5, generator=g) > 0.5,
        "half": torch.randn(3, 3, generator=g).to(torch.float16),
    }


class Collect:
    """A sink that rebuilds tensors in fresh CPU memory."""

    def __init__(self, layout: dict[str, TensorLayout]) -> None:
        self.buffers = {name: bytearray(lay.nbytes) for name, lay in layout.items()}

    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        self.buffers[entry.name][offset : offset + len(data)] = data


def layout_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorLayout]:
    return {name: TensorLayout.of(t) for name, t in tensors.items()}


def feed_in_pieces(reader: PayloadReader, blob: bytes, rng: random.Random) -> None:
    position = 0
    while position < len(blob):
        step = rng.choice([1, 3, 8, 64, 1000, len(blob)])
        reader.feed(blob[position : position + step])
        position += step


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_chunks_form_a_file_the_safetensors_library_reads(chunk_bytes: int) -> None:
    tensors = sample_tensors()
    payload = Payload.of(list(tensors.items()))
    chunks = list(payload.chunks(chunk_bytes))
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    blob = b"".join(chunks)
    assert len(blob) == payload.nbytes
    loaded = safetensors.torch.load(blob)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


@pytest.mark.parametrize("seed", range(5))
def test_reader_rebuilds_every_byte_and_hash_whatever_the_splits(seed: int) -> None:
    tensors = sample_tensors()
    blob = b"".join(Payload.of(list(tensors.items())).chunks(5))
    sink = Collect(layout_of(tensors))
    reader = PayloadReader(len(blob), layout_of(tensors), sink)
    feed_in_pieces(reader, blob, random.Random(seed))
    hashes = reader.finish()
    assert hashes == {name: tensor_hash(t) for name, t in tensors.items()}
    for name, tensor in tensors.items():
        rebuilt = (
            torch.frombuffer(sink.buffers[name], dtype=torch.uint8) if tensor.numel() else None
        )
        if rebuilt is not None:
            assert torch.equal(rebuilt.view(tensor.dtype).reshape(tensor.shape), tensor)


def test_reader_accepts_a_subset_of_the_model_for_deltas() -> None:
    tensors = sample_tensors()
    subset = {"a.weight": tensors["a.weight"]}
    blob = b"".join(Payload.of(list(subset.items())).chunks())
    reader = PayloadReader(len(blob), layout_of(tensors), Collect(layout_of(tensors)))
    reader.feed(blob)
    assert reader.finish().keys() == {"a.weight"}


def test_reader_accepts_files_written_by_the_safetensors_library() -> None:
    tensors = {k: v for k, v in sample_tensors().items() if v.numel()}
    blob = safetensors.torch.save(tensors)
    reader = PayloadReader(len(blob), layout_of(tensors), Collect(layout_of(tensors)))
    reader.feed(blob)
    assert reader.finish() == {name: tensor_hash(t) for name, t in tensors.items()}


def raw_payload(table: object, data: bytes = b"", header_len: int | None = None) -> bytes:
    body = json.dumps(table).encode()
    size = len(body) if header_len is None else header_len
    return size.to_bytes(8, "little") + body + data


MODEL = {"w": TensorLayout("F32", (2, 2)), "b": TensorLayout("F32", (2,))}
GOOD = {
    "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
}


def read(blob: bytes, payload_bytes: int | None = None, max_header: int = 1 << 20) -> None:
    reader = PayloadReader(
        len(blob) if payload_bytes is None else payload_bytes, MODEL, Collect(MODEL), max_header
    )
    reader.feed(blob)
    reader.finish()


def test_a_well_formed_payload_passes() -> None:
    read(raw_payload(GOOD, bytes(24)))


@pytest.mark.parametrize(
    ("table", "data", "message"),
    [
        ({"x": GOOD["w"]}, bytes(16), "unknown tensor 'x'"),
        ({"w": {**GOOD["w"], "dtype": "F16"}}, bytes(16), "dtype 'F16' but the model has F32"),
        ({"w": {**GOOD["w"], "shape": [4]}}, bytes(16), r"shape \[4\] but the model has \[2, 2\]"),
        ({"w": {**GOOD["w"], "data_offsets": [0, 8]}}, bytes(8), "span 8 bytes but"),
        ({"w": {**GOOD["w"], "data_offsets": [8, 24]}}, bytes(24), "leaves a gap"),
        (
            {"w": GOOD["w"], "b": {**GOOD["b"], "data_offsets": [8, 16]}},
            bytes(16),
            "overlaps the previous tensor",
        ),
        ({"w": {**GOOD["w"], "data_offsets": [16, 0]}}, bytes(16), "is not \\[begin, end\\)"),
        ({"w": {"dtype": "F32", "shape": [2, 2]}}, bytes(16), "exactly dtype, shape"),
        ({"w": {**GOOD["w"], "shape": [2, -2]}}, bytes(16), "is not a list of sizes"),
        ([1, 2], b"", "must be a JSON object"),
        ({"__metadata__": {"k": 1}, **GOOD}, bytes(24), "__metadata__ must map strings"),
        (GOOD, bytes(32), "describes 24 data bytes but the push carries 32"),
    ],
)
def test_bad_headers_are_refused_with_a_message(table: object, data: bytes, message: str) -> None:
    with pytest.raises(MalformedPushError, match=message):
        read(raw_payload(table, data))


def test_header_that_is_not_json_is_refused() -> None:
    with pytest.raises(MalformedPushError, match="not valid JSON"):
        read((5).to_bytes(8, "little") + b"{nope" + bytes(24))


def test_header_longer_than_the_limit_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(ResourceLimitError, match="exceeds the 64-byte limit"):
        read(raw_payload(GOOD, bytes(24)), max_header=64)


def test_header_length_beyond_the_payload_is_refused() -> None:
    with pytest.raises(MalformedPushError, match="exceeds the 40-byte payload"):
        read(raw_payload(GOOD, b"", header_len=1000)[:40])


def test_truncated_payload_is_refused_at_finish() -> None:
    blob = raw_payload(GOOD, bytes(24))
    with pytest.raises(MalformedPushError, match=f"ended after {len(blob) - 1} of {len(blob)}"):
        read(blob[:-1], payload_bytes=len(blob))


def test_bytes_beyond_the_announced_size_are_refused() -> None:
    blob = raw_payload(GOOD, bytes(24))
    with pytest.raises(MalformedPushError, match="more than the"):
        read(blob + b"x", payload_bytes=len(blob))


def test_payload_too_small_for_a_length_is_refused() -> None:
    with pytest.raises(MalformedPushError, match="at least 8 bytes"):
        PayloadReader(3, MODEL, Collect(MODEL))


def test_digest_covers_names_dtypes_shapes_and_bytes() -> None:
    base = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    digest = state_digest(base)
    assert state_digest(dict(reversed(list(base.items())))) == digest
    assert state_digest({"w": torch.ones(2, 2), "c": torch.zeros(2)}) != digest
    assert state_digest({"w": torch.ones(4), "b": torch.zeros(2)}) != digest
    assert state_digest({"w": torch.ones(2, 2).double(), "b": torch.zeros(2)}) != digest
    flipped = base["w"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one bit
    assert state_digest({"w": flipped, "b": base["b"]}) != digest
    table = {n: (TensorLayout.of(t), tensor_hash(t)) for n, t in base.items()}
    assert model_digest(table) == digest
