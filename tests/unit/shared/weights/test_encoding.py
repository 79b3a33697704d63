"""Element-level encodings: decode(encode(new, base)) == new bit for bit; bad bytes refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.weights.encoding import (
    ENCODINGS,
    SPARSE,
    XOR_LZ4,
    XOR_ZSTD,
    EncodingError,
    changed_positions,
    changed_share,
    decode,
    encode,
    encode_tensor,
    host_bytes,
    sampled,
    sampled_share,
    varint_decode,
    varint_encode,
)
from shared.weights.layout import ENCODINGS_KEY
from shared.weights.writer import Payload
from tests.devices import devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64]


def flat(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def pair(dtype: torch.dtype, size: int, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """A base tensor and a new one with about `fraction` of its elements changed (bitwise)."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        base = (torch.randn(size, generator=g) * 10).to(dtype)
    else:
        info = torch.iinfo(dtype)
        base = torch.randint(info.min, info.max, (size,), generator=g, dtype=torch.int64).to(dtype)
    new = base.clone()
    changed = torch.rand(size, generator=g) < fraction
    words = new.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[new.element_size()]
    )
    words[changed] ^= 1 + torch.randint(0, 100, (int(changed.sum()),), generator=g).to(words.dtype)
    return flat(new), flat(base)


def roundtrip(encoding: str, new: np.ndarray, base: np.ndarray, itemsize: int) -> None:
    data = encode(encoding, new, base, itemsize)
    if data is None:  # not smaller: whole bytes travel instead
        return
    assert len(data) < len(new)
    out = np.full_like(new, 0xAB)
    digest = decode(encoding, data, base, itemsize, out)
    assert out.tobytes() == new.tobytes()
    assert digest == xxhash.xxh3_128_digest(new.tobytes())  # what the receiver checks


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tensor_of_many_blocks_decodes_and_hashes_whole(
    encoding: str, dtype: torch.dtype
) -> None:
    """Decoding works a block of bytes at a time: a tensor of several blocks, a short last
    one, changes on every side of their edges."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    size = (5 * (1 << 18) + 4100) // itemsize
    roundtrip(encoding, *pair(dtype, size, 0.03, 11), itemsize)


@settings(max_examples=60, deadline=None)
@given(
    encoding=st.sampled_from(ENCODINGS),
    dtype=st.sampled_from(DTYPES),
    size=st.integers(0, 5000),
    fraction=st.sampled_from([0.0, 0.001, 0.03, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_decode_of_encode_is_the_new_tensor_bit_for_bit(
    encoding: str, dtype: torch.dtype, size: int, fraction: float, seed: int
) -> None:
    new, base = pair(dtype, size, fraction, seed)
    roundtrip(encoding, new, base, torch.empty(0, dtype=dtype).element_size())


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), base=st.binary(min_size=0, max_size=3000))
def test_arbitrary_bytes_roundtrip_against_an_unrelated_base(data: bytes, base: bytes) -> None:
    size = min(len(data), len(base)) // 8 * 8
    new_bytes = np.frombuffer(data[:size], np.uint8).copy()
    base_bytes = np.frombuffer(base[:size], np.uint8).copy()
    for encoding in ENCODINGS:
        for itemsize in (1, 2, 4, 8):
            roundtrip(encoding, new_bytes, base_bytes, itemsize)


def test_special_values_compare_by_bits() -> None:
    base = torch.tensor([0.0, float("nan"), 1.0, -1.0] * 64)
    new = base.clone()
    new[0] = -0.0  # equal as a value, not as bits
    new[1] = float("nan")  # the same bits: unchanged
    positions = changed_positions(flat(new), flat(base), 4)
    assert positions.tolist() == [0]
    roundtrip(SPARSE, flat(new), flat(base), 4)


def test_a_sparse_change_is_small_and_gap_coded() -> None:
    new, base = pair(torch.bfloat16, 100_000, 0.03, 7)
    data = encode(SPARSE, new, base, 2)
    assert data is not None
    changed = len(changed_positions(new, base, 2))
    assert len(data) < changed * 2 + changed * 1.2 + 16  # values plus about a byte a position


@pytest.mark.parametrize("values", [[], [0], [127, 128, 16383, 16384, 2**63 - 1, 2**64 - 1]])
def test_varints_roundtrip(values: list[int]) -> None:
    array = np.array(values, dtype=np.uint64)
    assert varint_decode(varint_encode(array), len(values)).tolist() == values


@given(
    st.lists(
        st.one_of(st.integers(0, 127), st.integers(128, 2**21), st.integers(0, 2**64 - 1)),
        max_size=200,
    )
)
def test_varints_of_every_length_mixed_roundtrip(values: list[int]) -> None:
    array = np.array(values, dtype=np.uint64)
    assert varint_decode(varint_encode(array), len(values)).tolist() == values


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (bytes([0x80] * 10 + [0x01]), 1, "runs longer than 10 bytes"),
        (bytes([0x05, 0x80]), 2, "do not hold exactly 2"),  # the last one never ends
        (bytes([0x05, 0x81, 0x01]), 3, "do not hold exactly 3"),
        (bytes([0x05]), 0, "do not hold exactly 0"),
    ],
)
def test_varints_that_do_not_hold_their_count_are_refused(
    data: bytes, count: int, message: str
) -> None:
    with pytest.raises(EncodingError, match=message):
        varint_decode(np.frombuffer(data, np.uint8), count)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_truncated_bytes_are_refused(encoding: str) -> None:
    new, base = pair(torch.float32, 4000, 0.03, 3)
    data = encode(encoding, new, base, 4)
    assert data is not None
    out = np.zeros_like(new)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(EncodingError):
            decode(encoding, data[:cut], base, 4, out)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_extra_bytes_are_refused(encoding: str) -> None:
    new, base = pair(torch.float32, 4000, 0.03, 4)
    data = encode(encoding, new, base, 4)
    assert data is not None
    with pytest.raises(EncodingError):
        decode(encoding, data + b"\x00", base, 4, np.zeros_like(new))


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        (SPARSE, "names 4294967295 changed elements"),
        (XOR_ZSTD, "not a zstd frame"),
        (XOR_LZ4, "lz4 block is corrupt"),
    ],
)
def test_garbage_is_refused_with_a_message(encoding: str, message: str) -> None:
    base = np.zeros(4000, np.uint8)
    garbage = b"\xff\xff\xff\xff" + b"\x00" * 60
    with pytest.raises(EncodingError, match=message):
        decode(encoding, garbage, base, 4, np.zeros_like(base))


def test_sparse_positions_past_the_end_are_refused() -> None:
    base = np.zeros(40, np.uint8)  # 10 fp32 elements
    head = np.array([1, 1], dtype="<u8").tobytes()
    data = head + bytes([10]) + b"\x01\x00\x00\x00"  # position 10 of 10
    with pytest.raises(EncodingError, match="past the tensor"):
        decode(SPARSE, data, base, 4, np.zeros_like(base))


def test_a_sparse_position_whose_varint_runs_past_64_bits_is_refused() -> None:
    base = np.zeros(1024, np.uint8)
    overlong = bytes([0x80] * 9 + [0x02])  # 2**64: would wrap to gap 0, position 0
    data = np.array([1, len(overlong)], dtype="<u8").tobytes() + overlong + b"\x07"
    out = np.zeros_like(base)
    with pytest.raises(EncodingError, match=r"a varint holds a value past 2\*\*64 - 1"):
        decode(SPARSE, data, base, 1, out)
    assert not out.any()
    largest = bytes([0xFF] * 9 + [0x01])  # 2**64 - 1: read whole, and past the tensor
    data = np.array([1, len(largest)], dtype="<u8").tobytes() + largest + b"\x07"
    with pytest.raises(EncodingError, match="past the tensor"):
        decode(SPARSE, data, base, 1, out)


def test_unknown_encoding_is_refused() -> None:
    base = np.zeros(8, np.uint8)
    with pytest.raises(EncodingError, match="unknown encoding"):
        decode("gzip", b"", base, 4, np.zeros_like(base))


def test_a_payload_with_encoded_tensors_is_still_a_safetensors_file(tmp_path: Path) -> None:
    new, base = pair(torch.bfloat16, 4096, 0.03, 5)
    data = encode(SPARSE, new, base, 2)
    assert data is not None
    tensors = [("w", torch.from_numpy(new.copy()).view(torch.bfloat16)), ("b", torch.ones(3))]
    path = tmp_path / "push.safetensors"
    path.write_bytes(b"".join(Payload.of(tensors, encoded={"w": (SPARSE, data)}).chunks()))
    with safetensors.safe_open(path, "pt") as f:
        assert f.get_tensor("w").numpy().tobytes() == data
        assert torch.equal(f.get_tensor("b"), torch.ones(3))
        described = json.loads(f.metadata()[ENCODINGS_KEY])
    assert described == {"w": {"encoding": SPARSE, "dtype": "BF16", "shape": [4096]}}


def reference_positions(new: np.ndarray, base: np.ndarray, itemsize: int) -> list[int]:
    """Changed positions the plain way: every element compared on its own."""
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    return np.flatnonzero(new.view(word) != base.view(word)).tolist()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    size=st.integers(0, 3000),
    fraction=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_changed_positions_compared_by_words_are_every_changed_element(
    dtype: torch.dtype, size: int, fraction: float, seed: int
) -> None:
    new, base = pair(dtype, size, fraction, seed)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    assert changed_positions(new, base, itemsize).tolist() == reference_positions(
        new, base, itemsize
    )


def test_changed_positions_across_blocks_and_in_the_tail() -> None:
    base = np.zeros((1 << 19) + 3, np.uint16)  # two blocks of words, and 3 elements past them
    new = base.copy()
    moved = [0, 3, 4, 262_143, 262_144, 262_145, len(base) - 1]
    new[moved] = 7
    assert changed_positions(new.view(np.uint8), base.view(np.uint8), 2).tolist() == moved


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.int64])
def test_tensors_compared_where_they_live_encode_to_the_same_bytes(
    device: str, encoding: str, dtype: torch.dtype
) -> None:
    new_host, base_host = pair(dtype, 50_000, 0.03, 11)
    new = torch.from_numpy(new_host.copy()).view(dtype).to(device)
    base = torch.from_numpy(base_host.copy()).view(dtype).to(device)
    itemsize = new.element_size()
    expected = encode(encoding, new_host, base_host, itemsize)
    assert expected is not None
    assert encode_tensor(encoding, new, base, on_device=True) == expected
    assert encode_tensor(encoding, new, base, on_device=False) == expected
    assert host_bytes(new).tobytes() == new_host.tobytes()


@pytest.mark.parametrize("device", devices())
def test_a_dense_change_compared_where_it_lives_is_not_encoded_sparse(device: str) -> None:
    new = torch.arange(10_000, dtype=torch.int32, device=device)
    assert encode_tensor(SPARSE, new, new + 1, on_device=True) is None
    assert changed_share(new, new + 1) == 1.0
    assert changed_share(new, new.clone(), sample=16) == 0.0


@pytest.mark.parametrize("device", devices())
def test_a_sample_kept_apart_measures_the_same_share_as_the_tensors_it_was_taken_from(
    device: str,
) -> None:
    base = torch.arange(1 << 20, dtype=torch.int16, device=device)  # 64 blocks' worth
    new = base.clone()
    new[::4] += 1  # a quarter of every block moves
    probe = sampled(base, 256).clone()
    assert probe.shape == (16, 256)
    assert sampled_share(sampled(new, 256), probe) == changed_share(new, base, 256) == 0.25
    small = torch.zeros(100, dtype=torch.int16, device=device)  # no larger than a sample: all
    assert sampled(small, 256).shape == (100,)
    assert sampled_share(sampled(small + 1, 256), sampled(small, 256)) == 1.0
