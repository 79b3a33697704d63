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
over the raw bytes, nothing loops per element: changed elements are found comparing 8-byte
words a block at a time, and only the words that differ are split into elements. For tensors
off the CPU (a CUDA trainer's), `encode_tensor` compares them with torch where they live and
copies only the changed positions and values (or the XOR) to the host.
`encode` returns None when an encoding would not be smaller than the whole bytes, so one never
travels larger; `decode` checks every length and position and raises EncodingError (a
ValueError) naming what is wrong, before writing anything the caller would keep. `decode` also
returns the xxh3_128 of what it wrote (the receiver checks the push's digest with it), hashed a
block at a time while the block is still in cache from being written: hashing the tensor after
decoding it read it from memory once more, about a fifth of a sparse decode's time.
"""

from __future__ import annotations

import os

import lz4.block
import numpy as np
import torch
import xxhash
import zstandard

WHOLE = "whole"
XOR_ZSTD = "xor-zstd"
XOR_LZ4 = "xor-lz4"
SPARSE = "sparse"
ENCODINGS = (XOR_ZSTD, XOR_LZ4, SPARSE)  # besides WHOLE, which is no encoding

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TORCH_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 1 << 16  # 8-byte words compared per pass: the operands stay in cache
_PATCH_BYTES = 1 << 18  # bytes of a sparse tensor's base copied, then patched, per pass
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
    """The positions (int64, increasing) of the elements whose bits differ.

    Compared 8 bytes at a time (a block at a time, so the operands stay in cache): most words
    of a sparse change are equal, and only the words that differ are split into elements."""
    size = len(new)
    whole = size - size % 8
    aw, bw = new[:whole].view(np.uint64), base[:whole].view(np.uint64)
    lanes = 8 // itemsize
    shift = lanes.bit_length() - 1
    word = _WORDS[itemsize]
    parts = []
    differs = np.empty(min(len(aw), _BLOCK), np.bool_)
    for start in range(0, len(aw), _BLOCK):
        a, b = aw[start : start + _BLOCK], bw[start : start + _BLOCK]
        mask = differs[: len(a)]
        np.not_equal(a, b, out=mask)
        found = np.flatnonzero(mask)
        if not len(found):
            continue
        if lanes > 1:
            xor = np.take(a, found)
            xor ^= np.take(b, found)
            lane = np.flatnonzero(xor.view(word) != 0)  # a bool mask: the fast path
            found = np.take(found, lane >> shift)
            found += start
            found <<= shift
            found += lane & (lanes - 1)
        elif start:
            found += start
        parts.append(found)
    if whole < size:  # the last few elements, past the last whole word
        a, b = words(new[whole:], itemsize), words(base[whole:], itemsize)
        parts.append(np.flatnonzero(a != b) + whole // itemsize)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def encode(encoding: str, new: np.ndarray, base: np.ndarray, itemsize: int) -> bytes | None:
    """`new` (flat uint8) described against `base`; None where not smaller than `new`."""
    if new.shape != base.shape:
        raise ValueError(f"new and base differ in size: {new.shape} vs {base.shape}")
    if encoding == SPARSE:
        data = _sparse(new, base, itemsize)
    else:
        data = _compress(encoding, np.bitwise_xor(new, base))
    return data if data is not None and len(data) < len(new) else None


def _compress(encoding: str, xor: np.ndarray) -> bytes:
    if encoding == XOR_ZSTD:
        return _compressor().compress(xor.data)
    if encoding == XOR_LZ4:
        return bytes(lz4.block.compress(xor, store_size=False))
    raise ValueError(f"unknown encoding {encoding!r}")


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array on the host (a view for a contiguous CPU one)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _tensor_words(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as integer words of its element size, flat, on its device."""
    word = _TORCH_WORDS.get(tensor.element_size())
    if word is None:
        raise ValueError(f"no element-level encoding for {tensor.element_size()}-byte elements")
    return tensor.detach().contiguous().reshape(-1).view(word)


def encode_tensor(
    encoding: str, new: torch.Tensor, base: torch.Tensor, *, on_device: bool | None = None
) -> bytes | None:
    """`encode` of two tensors of one dtype and shape. With `on_device` (the default for
    tensors off the CPU, a CUDA trainer's) the tensors are compared with torch where they live
    and only what the encoding needs comes to the host: for `sparse` the changed positions and
    their values, for the XOR encodings the XOR. The bytes are the same either way."""
    if new.shape != base.shape or new.dtype != base.dtype or new.device != base.device:
        raise ValueError("new and base differ in shape, dtype or device")
    if on_device is None:
        on_device = new.device.type != "cpu"
    itemsize, size = new.element_size(), new.numel() * new.element_size()
    if not on_device:
        return encode(encoding, host_bytes(new), host_bytes(base), itemsize)
    a, b = _tensor_words(new), _tensor_words(base)
    if encoding == SPARSE:
        differs = torch.ne(a, b)
        if int(torch.count_nonzero(differs)) * itemsize + _SPARSE_HEADER >= size:
            return None  # counted where the tensors live: nothing is copied for a dense change
        positions = torch.nonzero(differs).reshape(-1)
        values = a[positions].cpu().numpy().view(_WORDS[itemsize])
        return sparse_bytes(positions.cpu().numpy().astype(np.int64, copy=False), values, size)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    xor = torch.bitwise_xor(a, b).cpu().view(torch.uint8).numpy()
    data = _compress(encoding, xor)
    return data if len(data) < size else None


SAMPLE_BLOCKS = 16  # evenly spaced blocks a tensor's change is sampled in
SAMPLE_ELEMENTS = 4096  # elements at the start of each block the cost model samples


def sampled(tensor: torch.Tensor, sample: int) -> torch.Tensor:
    """The first `sample` elements of each of SAMPLE_BLOCKS evenly spaced blocks of `tensor`,
    as integer words where it lives (a view, no copy); all of its elements where it has no
    more than that."""
    a = _tensor_words(tensor)
    count = len(a)
    if count <= SAMPLE_BLOCKS * sample:
        return a
    step = count // SAMPLE_BLOCKS
    return a[: step * SAMPLE_BLOCKS].reshape(SAMPLE_BLOCKS, step)[:, :sample]


def changed_share(new: torch.Tensor, base: torch.Tensor, sample: int | None = None) -> float:
    """The share of elements whose bits differ, with torch where the tensors live; on the
    first `sample` elements of each of SAMPLE_BLOCKS evenly spaced blocks where `sample` is
    given (`sampled`)."""
    if sample is None:
        a, b = _tensor_words(new), _tensor_words(base)
    else:
        a, b = sampled(new, sample), sampled(base, sample)
    return sampled_share(a, b)


def sampled_share(new: torch.Tensor, base: torch.Tensor) -> float:
    """The share of differing words between two samples of one shape (`sampled`)."""
    count = new.numel()
    if not count:
        return 0.0
    if new.device.type == "cpu":  # numpy: no intra-op threads to wake for a small sample
        differs = np.count_nonzero(new.numpy() != base.numpy())
        return int(differs) / count
    return int(torch.count_nonzero(torch.ne(new, base))) / count


def decode(
    encoding: str, data: bytes | memoryview, base: np.ndarray, itemsize: int, out: np.ndarray
) -> bytes:
    """Write into `out` (flat uint8, base's size) the bytes `data` describes against `base`;
    returns their xxh3_128."""
    size = len(base)
    hasher = xxhash.xxh3_128()
    if encoding == SPARSE:
        positions, values = _read_sparse(data, size // itemsize, itemsize)
        _patched_copy(out, base, itemsize, positions, values, hasher)
        return hasher.digest()
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
    xor = np.frombuffer(raw, np.uint8)
    for start in range(0, size, _PATCH_BYTES):
        block = out[start : start + _PATCH_BYTES]
        np.bitwise_xor(base[start : start + len(block)], xor[start : start + len(block)], out=block)
        hasher.update(block.data)
    return hasher.digest()


def _patched_copy(
    out: np.ndarray,
    base: np.ndarray,
    itemsize: int,
    positions: np.ndarray,
    values: np.ndarray,
    hasher: xxhash.xxh3_128,
) -> None:
    """`out` = `base` with `values` at `positions` (element positions, increasing, checked),
    a block of bytes at a time, each block patched and hashed while it is still in cache from
    its copy (copying the whole tensor, then patching it, then hashing it took half as long
    again)."""
    block = _PATCH_BYTES // itemsize
    out_words, base_words = words(out, itemsize), words(base, itemsize)
    count = len(base_words)
    ends = np.searchsorted(positions, np.arange(block, count, block)).tolist()
    ends.append(len(positions))
    first = 0
    for start, end in zip(range(0, count, block), ends, strict=True):
        target = out_words[start : start + block]
        np.copyto(target, base_words[start : start + block])
        if end > first:
            out_words[positions[first:end]] = values[first:end]
        hasher.update(target.data)
        first = end


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
    return sparse_bytes(positions, np.take(words(new, itemsize), positions), len(new))


def sparse_bytes(positions: np.ndarray, values: np.ndarray, size: int) -> bytes | None:
    """The `sparse` encoding of a tensor of `size` bytes whose elements at `positions` (int64,
    increasing) take `values` (unsigned words); None where it would not be smaller."""
    count = len(positions)
    if count * values.itemsize + _SPARSE_HEADER >= size:
        return None
    gaps = np.empty(count, np.int64)
    if count:
        gaps[0] = positions[0]
        np.subtract(positions[1:], positions[:-1], out=gaps[1:])
        gaps[1:] -= 1
    varints = varint_encode(gaps.view(np.uint64))
    head = np.array([count, len(varints)], dtype="<u8").tobytes()
    data = b"".join([head, varints.tobytes(), values.tobytes()])
    return data if len(data) < size else None


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
    gaps += np.uint64(1)  # position i is the sum of the first i + 1 (gap + 1), minus one
    positions = np.cumsum(gaps, out=gaps).view(np.int64)  # in place: no copies
    positions -= 1
    if count and positions[-1] >= elements:
        raise EncodingError(
            f"its last position {int(positions[-1])} is past the tensor's {elements} elements"
        )
    values = raw[stop:].view(_WORDS[itemsize])
    return positions, values


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of each uint64 in `values`, back to back: every value's low 7 bits (with
    its continuation bit), and after each value that needs more, the LEB128 bytes of the rest
    of it (the same done again on those few, inserted in place)."""
    values = values.astype(np.uint64, copy=False)
    more = values >= np.uint64(0x80)
    low = values.astype(np.uint8)
    low &= np.uint8(0x7F)
    low |= more.view(np.uint8) << np.uint8(7)
    longer = np.flatnonzero(more)
    if not len(longer):  # every value under 128: one byte each
        return low
    tail = varint_encode(values[longer] >> np.uint64(7))
    if len(tail) == len(longer):  # each of them in two bytes
        return np.insert(low, longer + 1, tail)
    lengths = np.diff(np.flatnonzero(tail < 0x80), prepend=-1)
    return np.insert(low, np.repeat(longer + 1, lengths), tail)


def varint_decode(data: np.ndarray, count: int) -> np.ndarray:
    """`count` uint64 values from LEB128 bytes that hold exactly them; EncodingError else.

    Every value's first byte gives its low 7 bits; only the few bytes that continue a value
    (gaps of 128 elements or more) are then folded in, each at its place in its value."""
    ends = data < 0x80
    whole = int(np.count_nonzero(ends)) == count and (ends[-1] if count else not len(data))
    if not whole:
        raise EncodingError(f"its varints do not hold exactly {count} positions")
    if not count:
        return np.empty(0, np.uint64)
    if count == len(data):  # every value in one byte
        return data.astype(np.uint64)
    starts = np.empty(len(data), np.bool_)
    starts[0] = True
    starts[1:] = ends[:-1]
    values = data[starts].astype(np.uint64)
    values &= np.uint64(0x7F)
    more = np.flatnonzero(~ends)  # the bytes another of the same value follows
    ranks = np.arange(len(more))
    index = more - ranks  # the value each belongs to: the values ended before it
    first = np.empty(len(more), np.bool_)  # the first byte of its value
    first[0] = True
    np.not_equal(more[1:], more[:-1] + 1, out=first[1:])
    place = ranks - np.maximum.accumulate(np.where(first, ranks, 0))  # 0: its value's first
    if int(place.max()) >= _MAX_VARINT - 1:
        raise EncodingError("a varint runs longer than 10 bytes")
    following = data[more + 1]
    tenth = place == _MAX_VARINT - 2  # `following` is its value's tenth byte
    if tenth.any() and int(following[tenth].max()) > 1:  # bits past the 64th: it would wrap
        raise EncodingError("a varint holds a value past 2**64 - 1")
    shifts = (place.astype(np.uint64) + np.uint64(1)) * np.uint64(7)
    np.bitwise_or.at(values, index, (following & 0x7F).astype(np.uint64) << shifts)
    return values
