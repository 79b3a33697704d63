"""Element-level lossless encodings of a changed tensor against the base version's bytes.

A tensor changed by one optimizer step often keeps most of its elements bit for bit (bf16 weights
trained at a small learning rate). Three encodings describe it against the version the receiver
serves, each exact:

- `xor-zstd` / `xor-lz4`: the XOR of new and base bytes (zero wherever an element kept its
  bits), compressed by zstd level 1 (python-zstandard, multi-threaded) or lz4 (block format).
- `sparse`: the changed positions, in element order, as LEB128 varints of each gap minus one
  (the first position counts from -1), then the new values, packed:

      u64 count | u64 varint_bytes | varints | count * itemsize value bytes   (little-endian)

"Changed" compares bits, not values (NaN and -0.0 included). Everything is vectorised numpy
over the raw bytes viewed as unsigned words of the element size; nothing loops per element.
`encode` returns None when an encoding would not be smaller than the whole bytes, so one never
travels larger; `decode` checks every length and position and raises EncodingError (a
ValueError) naming what is wrong, before writing anything the caller would keep.
"""

from __future__ import annotations

import os

import lz4.block
import numpy as np
import zstandard

WHOLE = "whole"
XOR_ZSTD = "xor-zstd"
XOR_LZ4 = "xor-lz4"
SPARSE = "sparse"
ENCODINGS = (XOR_ZSTD, XOR_LZ4, SPARSE)  # besides WHOLE, which is no encoding

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_BLOCK = 1 << 18  # elements compared per pass: the operands stay in cache
_SPARSE_HEADER = 16
_MAX_VARINT = 10  # bytes of a LEB128 uint64
_COMPRESS_THREADS = min(os.cpu_count() or 1, 8)


class EncodingError(ValueError):
    """Encoded bytes that do not decode to a tensor of the expected size."""


def words(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Flat uint8 bytes viewed as unsigned words of `itemsize` bytes."""
    word = _WORDS.get(itemsize)
    if word is None:
        raise ValueError(f"no element-level encoding for {itemsize}-byte elements")
    return data.view(word)


def changed_positions(new: np.ndarray, base: np.ndarray, itemsize: int) -> np.ndarray:
    """The positions (int64, increasing) of the elements whose bits differ."""
    a, b = words(new, itemsize), words(base, itemsize)
    parts = []
    differs = np.empty(min(len(a), _BLOCK), np.bool_)
    for start in range(0, len(a), _BLOCK):
        block = a[start : start + _BLOCK]
        mask = differs[: len(block)]
        np.not_equal(block, b[start : start + len(block)], out=mask)
        found = np.flatnonzero(mask)
        if len(found):
            parts.append(found + start if start else found)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def encode(encoding: str, new: np.ndarray, base: np.ndarray, itemsize: int) -> bytes | None:
    """`new` (flat uint8) described against `base`; None where not smaller than `new`."""
    if new.shape != base.shape:
        raise ValueError(f"new and base differ in size: {new.shape} vs {base.shape}")
    if encoding == SPARSE:
        data = _sparse(new, base, itemsize)
    elif encoding == XOR_ZSTD:
        data = _compressor().compress(np.bitwise_xor(new, base))
    elif encoding == XOR_LZ4:
        data = lz4.block.compress(np.bitwise_xor(new, base), store_size=False)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return data if data is not None and len(data) < len(new) else None


def decode(
    encoding: str, data: bytes | memoryview, base: np.ndarray, itemsize: int, out: np.ndarray
) -> None:
    """Write into `out` (flat uint8, base's size) the bytes `data` describes against `base`."""
    size = len(base)
    if encoding == SPARSE:
        positions, values = _read_sparse(data, size // itemsize, itemsize)
        out[:] = base
        words(out, itemsize)[positions] = values
        return
    if encoding == XOR_ZSTD:
        raw = _decompress_zstd(data, size)
    elif encoding == XOR_LZ4:
        try:
            raw = lz4.block.decompress(data, uncompressed_size=size) if size else b""
        except lz4.block.LZ4BlockError as exc:
            raise EncodingError(f"the lz4 block is corrupt: {exc}") from None
    else:
        raise EncodingError(f"unknown encoding {encoding!r}")
    if len(raw) != size:
        raise EncodingError(f"it decompresses to {len(raw)} bytes; the tensor has {size}")
    np.bitwise_xor(base, np.frombuffer(raw, np.uint8), out=out)


def _compressor() -> zstandard.ZstdCompressor:
    # One per call: a ZstdCompressor is not safe to share between threads.
    return zstandard.ZstdCompressor(level=1, threads=_COMPRESS_THREADS, write_checksum=False)


def _decompress_zstd(data: bytes | memoryview, size: int) -> bytes:
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise EncodingError(f"not a zstd frame: {exc}") from None
    if params.content_size != size:
        raise EncodingError(
            f"its zstd frame holds {params.content_size} bytes; the tensor has {size}"
        )
    try:
        return zstandard.ZstdDecompressor().decompress(
            data, max_output_size=size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise EncodingError(f"the zstd frame is corrupt: {exc}") from None


def _sparse(new: np.ndarray, base: np.ndarray, itemsize: int) -> bytes | None:
    positions = changed_positions(new, base, itemsize)
    if len(positions) * itemsize + _SPARSE_HEADER >= len(new):
        return None  # the values alone would not be smaller
    gaps = np.empty(len(positions), np.int64)
    if len(positions):
        gaps[0] = positions[0]
        np.subtract(positions[1:], positions[:-1], out=gaps[1:])
        gaps[1:] -= 1
    varints = varint_encode(gaps.view(np.uint64))
    values = words(new, itemsize)[positions]
    head = np.array([len(positions), len(varints)], dtype="<u8").tobytes()
    return b"".join([head, varints.tobytes(), values.tobytes()])


def _read_sparse(
    data: bytes | memoryview, elements: int, itemsize: int
) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(data, np.uint8)
    if len(raw) < _SPARSE_HEADER:
        raise EncodingError(f"{len(raw)} bytes are shorter than the sparse header")
    count, varint_bytes = (int(v) for v in raw[:_SPARSE_HEADER].view("<u8"))
    if count > elements:
        raise EncodingError(f"it names {count} changed elements of {elements}")
    if varint_bytes > len(raw) or _SPARSE_HEADER + varint_bytes + count * itemsize != len(raw):
        raise EncodingError(
            f"{len(raw)} bytes do not hold the header, {varint_bytes} varint bytes and "
            f"{count} values of {itemsize} bytes"
        )
    stop = _SPARSE_HEADER + varint_bytes
    gaps = varint_decode(raw[_SPARSE_HEADER:stop], count)
    if count and (int(gaps.max()) >= elements or float(gaps.sum(dtype=np.float64)) >= elements):
        raise EncodingError(f"its positions run past the tensor's {elements} elements")
    positions = np.cumsum(gaps + np.uint64(1), dtype=np.uint64).astype(np.int64) - 1
    if count and positions[-1] >= elements:
        raise EncodingError(
            f"its last position {int(positions[-1])} is past the tensor's {elements} elements"
        )
    values = raw[stop:].view(_WORDS[itemsize])
    return positions, values


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of each uint64 in `values`, back to back (vectorised by byte position)."""
    values = values.astype(np.uint64, copy=False)
    most = int(values.max()).bit_length() if len(values) else 0
    longest = max(1, -(-most // 7))
    if longest == 1:  # every gap under 128: one byte each
        return values.astype(np.uint8)
    lengths = np.ones(len(values), np.uint8)
    for j in range(1, longest):
        lengths += values >= np.uint64(1 << (7 * j))
    ends = np.cumsum(lengths, dtype=np.int64)
    out = np.empty(int(ends[-1]), np.uint8)
    starts = ends - lengths
    for j in range(longest):
        sel = np.flatnonzero(lengths > j) if j else slice(None)
        byte = ((values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[sel] + j] = byte | ((lengths[sel] > j + 1).view(np.uint8) << 7)
    return out


def varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    """`count` uint64 values from LEB128 bytes that hold exactly them; EncodingError else."""
    ends = np.flatnonzero(data < 0x80)
    if len(ends) != count or (count and ends[-1] != len(data) - 1) or (not count and len(data)):
        raise EncodingError(f"its varints do not hold exactly {count} positions")
    if not count:
        return np.empty(0, np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT:
        raise EncodingError("a varint runs longer than 10 bytes")
    values = (data[starts] & 0x7F).astype(np.uint64)
    for j in range(1, int(lengths.max())):
        sel = lengths > j
        values[sel] |= (data[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return values
