"""Outside review of the sync wire: encoded deltas built byte by byte from the docs
(review_wire.py)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import lz4.block
import pytest
import zstandard

from tests.integration.review_wire import (
    BIG,
    ENCODERS,
    INVALID,
    PRECONDITION,
    ST,
    U64,
    Lab,
    changed,
    digest,
    encoded,
    frame,
    opened_lab,
    raw,
    sparse,
    sparse_bytes,
    varint,
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with opened_lab(tmp_path_factory) as lab:
        yield lab


def test_each_encoding_built_from_the_docs_commits_bit_exactly(lab: Lab) -> None:
    m = lab.wide
    for seed, name in enumerate(ENCODERS):
        new = changed(m.state, seed + 11)
        enc = {n: (name, ENCODERS[name](new[n], m.state[n])) for n in new}
        also = {n: new[n] for n, (_, b) in enc.items() if len(b) >= new[n].nbytes}
        enc = {n: v for n, v in enc.items() if n not in also}
        answer = m.push(encoded(new, enc, also=also), digest(new), m.served().version)
        assert answer.digest == digest(new) == m.served().digest, name
        assert m.infer_version() == str(answer.version)
        m.state = new


def test_sparse_counts_lengths_and_gap_codes_that_do_not_fit_are_refused(lab: Lab) -> None:
    m = lab.wide
    base = m.state[BIG]
    n = base.numel()
    one = raw(base[0, :1] + 1)
    cases = {  # every one fits in the tensor's 131072 bytes; none may decode
        "count of 2^64-1, nothing after": sparse_bytes(b"", b"", U64),
        "count of 2^63 (count*2 wraps to 0)": sparse_bytes(b"", b"", 1 << 63),
        "count of 2^63+1 (count*2 wraps to 2)": sparse_bytes(b"\0", one, (1 << 63) + 1),
        "varint bytes of 2^64-1": sparse_bytes(b"\0", one, 1, U64),
        "varint bytes of 2^64-16": sparse_bytes(b"\0", one, 1, U64 - 15),
        "a position at the end": sparse_bytes(varint(n), one, 1),
        "gaps that sum past the end": sparse_bytes(varint(n - 2) + varint(5), one * 2, 2),
        "a varint longer than 64 bits": sparse_bytes(b"\xff" * 11 + b"\x01", one, 1),
        "a varint cut off": sparse_bytes(b"\x80", one, 1),
        "values one short": sparse_bytes(b"\0\0", one, 2),
        "values one long": sparse_bytes(b"\0", one * 2, 1),
        "varint bytes claim more than there are": sparse_bytes(b"\0", one, 1, 3),
        "two varints in the bytes of one": sparse_bytes(b"\0\0", one, 1),
        "a count of 1 and no varint": sparse_bytes(b"", one, 1),
        "count 0 with trailing bytes": sparse_bytes(b"", b"", 0) + b"\0\0",
        "a header cut short": b"\0" * 15,
    }
    new = {**m.state}
    for what, blob in cases.items():
        assert len(blob) <= 2 * n, what
        m.refused(lambda b=blob: m.delta({BIG: ("sparse", b)}, new), INVALID, BIG, what=what)


def test_gap_codes_that_overflow_64_bits_do_not_wrap_onto_another_element(lab: Lab) -> None:
    """The digest sent is the one a wrapping decoder would compute: it must not commit."""
    m = lab.wide
    base = m.state[BIG]
    flat = base.reshape(-1)
    v1, v2 = flat[:1] + 1, flat[:1] + 2
    wrap_back = flat.clone()  # 10, then 10 + 2^64 - 1 (wraps to 9)
    wrap_back[10], wrap_back[9] = v1[0], v2[0]
    last = flat.clone()  # 2^64 - 1 (wraps to -1: the last element)
    last[-1] = v1[0]
    cases = [
        (varint(10) + varint(U64 - 1), raw(v1) + raw(v2), 2, wrap_back),
        (varint(U64), raw(v1), 1, last),
        (b"\xff" * 9 + b"\x7f", raw(v1), 1, last),  # 2^70 - 1, cut to 64 bits: 2^64 - 1
    ]
    for varints, values, count, garbage in cases:
        new = {**m.state, BIG: garbage.reshape(base.shape)}
        blob = sparse_bytes(varints, values, count)
        m.refused(
            lambda b=blob, s=new: m.delta({BIG: ("sparse", b)}, s), INVALID, BIG, what=varints
        )


def test_xor_frames_that_lie_or_bomb_are_refused_without_inflating(lab: Lab) -> None:
    m = lab.wide
    base = m.state[BIG]
    size = base.numel() * 2
    bomb = 512 << 20
    cz = zstandard.ZstdCompressor(level=1).compressobj(size=bomb)
    frame_512m = b"".join([cz.compress(b"\0" * (16 << 20)) for _ in range(32)] + [cz.flush()])
    lying = bytearray(frame_512m)
    at = bytes(lying[:18]).find(struct.pack("<I", bomb))
    assert at > 0
    lying[at : at + 4] = struct.pack("<I", size)  # declares the tensor's size, holds 512 MiB
    plain = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    no_size = b"".join([plain.compress(b"\0" * (16 << 20)) for _ in range(32)] + [plain.flush()])
    good = zstandard.ZstdCompressor(level=1).compress(bytes(size))
    # fmt: off
    cases = {
        "xor-zstd declaring 512 MiB": ("xor-zstd", frame_512m),
        "xor-zstd declaring the size, holding 512 MiB": ("xor-zstd", bytes(lying)),
        "xor-zstd with no declared size, holding 512 MiB": ("xor-zstd", no_size),
        "xor-zstd followed by a second frame": ("xor-zstd", good + good),
        "xor-zstd followed by junk": ("xor-zstd", good + b"junk"),
        "xor-zstd not a frame": ("xor-zstd", b"\0" * 64),
        "xor-lz4 one byte long": ("xor-lz4", lz4.block.compress(bytes(size + 1), store_size=0)),
        "xor-lz4 one byte short": ("xor-lz4", lz4.block.compress(bytes(size - 1), store_size=0)),
        "xor-lz4 garbage": ("xor-lz4", b"\xff" * 64),
        "xor-lz4 with a size prefix": ("xor-lz4", lz4.block.compress(bytes(size))),
        "an encoding larger than the tensor": ("xor-lz4", bytes(size + 8)),
    }
    # fmt: on
    for what, (encoding, blob) in cases.items():
        m.refused(
            lambda e=encoding, b=blob: m.delta({BIG: (e, b)}, m.state), INVALID, BIG, what=what
        )


def test_encoding_descriptions_that_do_not_fit_are_refused(lab: Lab) -> None:
    m = lab.wide
    new = changed(m.state, 21)
    ok = sparse(new[BIG], m.state[BIG])
    desc = {"encoding": "sparse", "dtype": "BF16", "shape": [256, 256]}

    def with_desc(d: object, entries: list | None = None, base: int | None = None) -> None:
        meta = {"weightsync.encodings": d if isinstance(d, str) else json.dumps(d)}
        blob = frame(entries or [(BIG, "U8", [len(ok)], ok)], meta)
        served = m.served().version
        base = served if base is None else base
        m.push(blob, digest(new), base, version=max(served, base) + 1)

    cases = [
        ({BIG: {**desc, "encoding": "gzip"}}, None, "gzip"),
        ({BIG: {**desc, "dtype": "F16"}}, None, BIG),
        ({BIG: {**desc, "shape": [65536]}}, None, BIG),
        ({BIG: {**desc, "shape": [256, 256, 1]}}, None, BIG),
        ({BIG: {"encoding": "sparse"}}, None, BIG),
        ({BIG: {**desc, "extra": 1}}, None, BIG),
        ({"nope": desc}, None, "nope"),
        ({BIG: desc}, [(BIG, "BF16", [len(ok) // 2], ok)], BIG),  # the entry is not U8
        ({BIG: desc}, [("net.0.bias", "U8", [len(ok)], ok)], "net.0.bias"),  # not carried
        ({BIG: desc, "net.2.bias": {**desc, "shape": [4]}}, None, "net.2.bias"),
        ([BIG], None, "weightsync.encodings"),
        ("42", None, "weightsync.encodings"),
        ("null", None, "weightsync.encodings"),
        ("{not json", None, "weightsync.encodings"),
        ({BIG: [1, 2]}, None, BIG),
    ]
    for d, entries, fragment in cases:
        m.refused(lambda d=d, e=entries: with_desc(d, e), INVALID, fragment, what=d)
    # an encoded tensor in a full push
    m.refused(lambda: with_desc({BIG: desc}, base=0), INVALID, BIG)
    # a base the receiver does not serve
    for base in (m.served().version + 7, m.served().version - 1):
        m.refused(
            lambda b=base: with_desc({BIG: desc}, base=b),
            PRECONDITION,
            reason="base-version-mismatch",
            what=base,
        )
    # after all that, an encoded delta that changes nothing commits as the next version
    before = m.served()
    m.delta({BIG: ("sparse", sparse(m.state[BIG], m.state[BIG]))}, m.state)
    after = m.served()
    assert (after.version, after.digest) == (before.version + 1, before.digest)
    assert m.infer_version() == str(after.version)


def test_metadata_json_bombs_inside_the_header_are_refused_as_invalid(lab: Lab) -> None:
    m = lab.wide
    ok = sparse(m.state[BIG], m.state[BIG])
    entries = [(BIG, "U8", [len(ok)], ok)]
    desc = {"encoding": "sparse", "dtype": "BF16", "shape": [256, 256]}
    digit = json.dumps({BIG: desc}).replace("256]", "9" * 5000 + "]", 1)
    values = {
        "encodings nested 100,000 deep": ("weightsync.encodings", "[" * 100_000),
        "encodings objects 100,000 deep": ("weightsync.encodings", '{"a":' * 100_000),
        "a 5,000-digit shape in encodings": ("weightsync.encodings", digit),
        "encodings of 4 MiB": (
            "weightsync.encodings",
            json.dumps({f"t{i}": desc for i in range(60_000)}),
        ),
        "tied nested 100,000 deep": ("weightsync.tied", "[" * 100_000),
    }
    for what, (key, value) in values.items():
        meta = {key: value}
        if key != "weightsync.encodings":
            meta["weightsync.encodings"] = json.dumps({BIG: desc})
        blob = frame(entries, meta)
        m.refused(
            lambda b=blob: m.push(b, digest(m.state), m.served().version), INVALID, key, what=what
        )
    # metadata values that are not strings, as safetensors requires them to be
    blob = frame(entries, {"weightsync.encodings": {BIG: desc}})  # type: ignore[dict-item]
    m.refused(lambda: m.push(blob, digest(m.state), m.served().version), INVALID, "metadata")


def test_encoding_a_tensor_no_encoding_can_shrink_is_refused(lab: Lab) -> None:
    """A zero-size tensor, a 0-d one, bool and int64 ones: no encoding is shorter."""
    m = lab.tied
    # fmt: off
    for name, encoding, data in [("nothing", "xor-lz4", b""), ("nothing", "sparse", bytes(16)),
                                 ("scale", "xor-zstd", b""), ("mask", "sparse", bytes(16)),
                                 ("bn.num_batches_tracked", "sparse", bytes(16))]:
        # fmt: on
        t = m.state[name]
        desc = {name: {"encoding": encoding, "dtype": ST[t.dtype], "shape": list(t.shape)}}
        blob = frame([(name, "U8", [len(data)], data)], {"weightsync.encodings": json.dumps(desc)})
        send = lambda b=blob: m.push(b, digest(m.state), m.served().version)  # noqa: E731
        m.refused(send, INVALID, name, what=(name, encoding))
