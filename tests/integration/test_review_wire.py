"""Outside review of the sync plane's wire: hostile or malformed pushes, built byte by byte.

Everything sent here is built from the docs only (docs/sync.md, docs/status-codes.md,
proto/weightsync/v1/weightsync.proto): the safetensors framing, `weightsync.encodings`
(sparse gap-coded positions + values, xor + lz4, xor + zstd), `weightsync.tied`, resume
offsets, routes and Seed. No product encoder or writer is used; the digest (xxh3_128 over
name, dtype, shape and each tensor's xxh3_128) is computed here too. Each bad push must get the
documented status with a message naming the problem, leave the served version and digest as
they were, keep the service answering ModelInfer, and not blow its memory up.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import lz4.block
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import xxhash
import zstandard

from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from tests.integration.conftest import Inference, Services, wait_until

WIDE = "tests.integration.encoding_apps:served_bf16"
TIED = "tests.integration.user_models:tied"
ST = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL"}
BIG = "net.0.weight"  # bf16 [256, 256] of the wide model
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
U64 = (1 << 64) - 1


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def frame(entries: list[tuple[str, str, list[int], bytes]], meta: dict | None = None) -> bytes:
    """A safetensors file: u64 header length, JSON header (8-aligned), tensor bytes."""
    header: dict = {} if meta is None else {"__metadata__": meta}
    offset, body = 0, []
    for name, dtype, shape, data in entries:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        body.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(body)


def whole(state: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    return frame([(n, ST[t.dtype], list(t.shape), raw(t)) for n, t in state.items()], meta)


def digest(state: dict[str, torch.Tensor]) -> bytes:
    h = xxhash.xxh3_128()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}\0{ST[t.dtype]}\0{','.join(map(str, t.shape))}\0".encode())
        h.update(xxhash.xxh3_128_digest(raw(t)))
    return h.digest()


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v >> 7 else 0))
        v >>= 7
        if not v:
            return bytes(out)


def sparse_bytes(varints: bytes, values: bytes, count: int, nvar: int | None = None) -> bytes:
    return struct.pack("<QQ", count, len(varints) if nvar is None else nvar) + varints + values


def sparse(new: torch.Tensor, base: torch.Tensor) -> bytes:
    a, b = (np.frombuffer(raw(x), np.uint16) for x in (new, base))
    pos = np.flatnonzero(a != b)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    return sparse_bytes(b"".join(varint(int(g)) for g in gaps), a[pos].tobytes(), len(pos))


def xor(new: torch.Tensor, base: torch.Tensor) -> bytes:
    return (np.frombuffer(raw(new), np.uint8) ^ np.frombuffer(raw(base), np.uint8)).tobytes()


ENCODERS = {  # zstd frames declare their size; lz4 travels as a bare block (no size prefix)
    "sparse": sparse,
    "xor-lz4": lambda new, base: lz4.block.compress(xor(new, base), store_size=False),
    "xor-zstd": lambda new, base: zstandard.ZstdCompressor(level=1).compress(xor(new, base)),
}


def encoded(
    new: dict[str, torch.Tensor],
    enc: dict[str, tuple[str, bytes]],
    extra: dict | None = None,
    also: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """A delta carrying `enc` (name -> (encoding, bytes)) as U8 entries, described in metadata."""
    desc = {
        n: {"encoding": e, "dtype": ST[new[n].dtype], "shape": list(new[n].shape)}
        for n, (e, _) in enc.items()
    }
    meta = {"weightsync.encodings": json.dumps(desc), **(extra or {})}
    plain = [(n, ST[t.dtype], list(t.shape), raw(t)) for n, t in (also or {}).items()]
    return frame([(n, "U8", [len(b)], b) for n, (_, b) in enc.items()] + plain, meta)


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Model:
    """One model on one service, with the state this file last committed there."""

    def __init__(self, inf: Inference, name: str, width: int) -> None:
        self.inf, self.name, self.width = inf, name, width
        self.channel = grpc.insecure_channel(inf.sync)
        self.push_call = self.channel.stream_unary(
            "/weightsync.v1.WeightSync/Push",
            request_serializer=None,
            response_deserializer=pb.PushResponse.FromString,
        )
        self.writer, self.epoch = "", 0
        self.state: dict[str, torch.Tensor] = {}
        self.lease()

    def lease(self, writer: str = "review") -> int:
        self.writer = writer
        self.epoch = (
            self.inf.sync_stub()
            .AcquireWriter(
                pb.AcquireWriterRequest(model_name=self.name, writer_id=writer), timeout=10
            )
            .epoch
        )
        return self.epoch

    def served(self) -> pb.ModelState:
        return self.inf.model_state(self.name)

    def header(self, size: int, base: int = 0, **fields: object) -> pb.PushRequest:
        h = pb.PushHeader(
            model_name=self.name,
            version=self.served().version + 1,
            base_version=base,
            writer_id=self.writer,
            payload_bytes=size,
            writer_epoch=self.epoch,
        )
        for key, value in fields.items():
            if key == "route":
                h.route.extend(value)  # type: ignore[arg-type]
            else:
                setattr(h, key, value)
        return pb.PushRequest(header=h)

    def messages(self, blob: bytes, dig: bytes, base: int = 0, **fields: object) -> list:
        head = self.header(len(blob), base, **fields)
        chunks = [
            pb.PushRequest(data=blob[i : i + (1 << 20)]) for i in range(0, len(blob), 1 << 20)
        ]
        return [head, *chunks, pb.PushRequest(commit=pb.PushCommit(digest=dig))]

    def push(self, blob: bytes, dig: bytes, base: int = 0, **fields: object) -> pb.PushResponse:
        msgs = self.messages(blob, dig, base, **fields)
        return self.push_call(iter([m.SerializeToString() for m in msgs]), timeout=30)

    def commit_full(self, state: dict[str, torch.Tensor], ties: dict | None = None) -> None:
        """Commit `state` in full, the names `ties` declares left out and declared tied."""
        meta = {"weightsync.tied": json.dumps(ties)} if ties else None
        self.push(
            whole({n: t for n, t in state.items() if n not in (ties or {})}, meta), digest(state)
        )
        self.state = state
        assert self.served().digest == digest(state)

    def delta(
        self,
        enc: dict[str, tuple[str, bytes]],
        new: dict,
        extra: dict | None = None,
        dig: bytes | None = None,
    ) -> pb.PushResponse:
        base = self.served().version
        return self.push(encoded(new, enc, extra), digest(new) if dig is None else dig, base)

    def infer_version(self) -> str:
        client = triton.InferenceServerClient(url=self.inf.data)
        x = triton.InferInput("x", [2, self.width], "FP32")
        x.set_data_from_numpy(np.ones((2, self.width), np.float32))
        return client.infer(self.name, [x], client_timeout=10).get_response().model_version

    def refused(
        self, send, code: grpc.StatusCode, *fragments: str, reason: str = "", what: object = ""
    ) -> str:
        """`send()` must fail with `code` naming `fragments`, and change nothing served."""
        before = self.served()
        pids = (self.inf.process.pid, self.inf.relay_pid)
        rss = [rss_mb(p) for p in pids]
        try:
            answer = send()
        except grpc.RpcError as error:
            details = error.details() or ""
            assert error.code() == code, (what, error.code(), details)
            for fragment in fragments:
                assert fragment in details, (what, fragment, details)
            if reason:
                trailers = dict(error.trailing_metadata() or ())
                assert trailers.get("error-reason") == reason, (what, trailers, details)
        else:
            now = self.served()
            raise AssertionError(
                f"{what!r} was not refused: answered {answer!r}; served "
                f"{before.version} before, {now.version} now"
            )
        self.unchanged(before)
        for pid, was in zip(pids, rss, strict=True):
            assert rss_mb(pid) - was < 300, f"process {pid} grew from {was:.0f} MB"
        return details

    def unchanged(self, before: pb.ModelState) -> None:
        now = self.served()
        assert (now.version, now.digest) == (before.version, before.digest)
        assert self.infer_version() == str(before.version)
        assert self.inf.process.poll() is None
        log = self.inf.log.read_text()
        assert "Traceback" not in log, log[-3000:]


def bf16_state(seed: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g).to(torch.bfloat16) for n, t in like.items()}


def changed(state: dict[str, torch.Tensor], seed: int, share: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.where(torch.rand(t.shape, generator=g) < share, t * 3 + 1, t)
        for n, t in state.items()
    }


class Lab:
    """Services started on first use: `wide` (sync relay on), `second` (off), `tied`."""

    def __init__(self, services: Services) -> None:
        self.services, self.models = services, {}

    def __getattr__(self, name: str) -> Model:
        if name not in self.models:
            extra = ("--sync-relay", "off") if name == "second" else ()
            inf = self.services.inference(
                TIED if name == "tied" else WIDE, "--push-resume-window-s", "30", *extra, name=name
            )
            model = self.models[name] = Model(
                inf, *(("tied", 8) if name == "tied" else ("wide", 256))
            )
            if name != "tied":
                like = {t.name: torch.empty(list(t.shape)) for t in model.served().tensors}
                model.commit_full(bf16_state(1, like))
            else:
                model.commit_full(tied_state(model, 5), TIES)
        self.models[name].lease()
        return self.models[name]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with Services(tmp_path_factory.mktemp("review_wire"), env) as services:
        yield Lab(services)


def port(model: Model) -> int:
    return int(model.inf.sync.rsplit(":", 1)[1])


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


# fmt: off
TIES = {"head.weight": "emb.weight", "again.weight": "proj.weight", "again.bias": "proj.bias",
        "alias": "proj.bias"}
# fmt: on


def tied_state(m: Model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kinds = {"F32": torch.float32, "I64": torch.int64, "BOOL": torch.bool}
    state = {}
    for t in m.served().tensors:
        dtype = kinds[t.dtype]
        state[t.name] = (
            torch.randn(list(t.shape), generator=g)
            if dtype == torch.float32
            else torch.ones(list(t.shape), dtype=dtype)
        )
    for name, source in TIES.items():
        state[name] = state[source]
    return state


def without(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if n != name}


def test_tied_declarations_that_do_not_fit_are_refused(lab: Lab) -> None:
    m = lab.tied
    state = tied_state(m, 5)
    carried = {n: t for n, t in state.items() if n not in TIES}
    dropped = without(carried, "emb.weight")
    # fmt: off
    cases = [
        (carried, {**TIES, "head.weight": "head.weight"}, "head.weight"),  # itself
        (dropped, {**TIES, "emb.weight": "head.weight"}, "emb.weight"),  # a cycle
        (carried, {**TIES, "head.weight": "nope"}, "nope"),  # not a tensor
        (carried, {**TIES, "nope": "emb.weight"}, "nope"),
        (dropped, TIES, "emb.weight"),  # names one not carried
        ({**carried, "head.weight": state["emb.weight"]}, TIES, "head.weight"),  # both carried
        (without(carried, "mask"), {**TIES, "mask": "bn.running_mean"}, "mask"),  # dtype
        (without(carried, "bn.running_mean"), {**TIES, "bn.running_mean": "emb.weight"},
         "bn.running_mean"),  # shape
        (carried, {**TIES, "head.weight": 7}, "weightsync.tied"),
        (carried, {**TIES, "head.weight": ["emb.weight"]}, "weightsync.tied"),
        (carried, list(TIES), "weightsync.tied"),
        (carried, "null", "weightsync.tied"),
        (carried, "{", "weightsync.tied"),
        ({**carried, "head.weight": state["emb.weight"]},  # a cycle through a carried name
         {**TIES, "head.weight": "again.weight", "again.weight": "head.weight"}, "head.weight"),
    ]
    # fmt: on
    for c, t, fragment in cases:
        blob = whole(c, {"weightsync.tied": t if isinstance(t, str) else json.dumps(t)})
        m.refused(lambda b=blob: m.push(b, digest(state)), INVALID, fragment, what=t)
    m.commit_full(state, TIES)  # the right ties commit
    # a delta tying a name to one it does not carry (the base holds it: not enough)
    delta = whole(
        {"proj.weight": state["proj.weight"] + 1},
        {"weightsync.tied": json.dumps({"head.weight": "emb.weight"})},
    )
    m.refused(lambda: m.push(delta, digest(state), m.served().version), INVALID, "emb.weight")


def test_an_encoded_carried_tensor_gives_its_tied_names_the_decoded_bytes(lab: Lab) -> None:
    m = lab.tied
    new = dict(m.state)
    emb = m.state["emb.weight"].clone()
    emb[3, 2] += 1
    new["emb.weight"] = new["head.weight"] = emb
    data = ENCODERS["xor-lz4"](emb, m.state["emb.weight"])
    extra = {"weightsync.tied": json.dumps({"head.weight": "emb.weight"})}
    bad = dict(new, **{"head.weight": m.state["emb.weight"]})  # the tie left on the old bytes
    m.refused(
        lambda: m.delta({"emb.weight": ("xor-lz4", data)}, new, extra, digest(bad)),
        INVALID,
        "digest",
    )
    answer = m.delta({"emb.weight": ("xor-lz4", data)}, new, extra)
    assert answer.digest == digest(new) == m.served().digest
    m.state = new


def broken(m: Model, blob: bytes, dig: bytes, upto: int) -> pb.PushHeader:
    """A push that sent `upto` payload bytes, then was cancelled; returns its header."""
    msgs = m.messages(blob, dig)
    gate = threading.Event()

    def stream() -> Iterator[bytes]:
        yield msgs[0].SerializeToString()
        yield pb.PushRequest(data=blob[:upto]).SerializeToString()
        gate.wait(20)

    future = m.push_call.future(stream(), timeout=30)
    wait_until(lambda: m.served().pending.bytes_received >= upto, timeout=10)
    future.cancel()
    gate.set()
    wait_until(lambda: m.served().pending.bytes_received == upto, timeout=10)
    return msgs[0].header


def resume(m: Model, head: pb.PushHeader, blob: bytes, offset: int, dig: bytes, **fields) -> None:
    h = pb.PushHeader()
    h.CopyFrom(head)
    h.resume_from = offset
    for key, value in fields.items():
        setattr(h, key, value)
    msgs = [
        pb.PushRequest(header=h),
        pb.PushRequest(data=blob[min(offset, len(blob)) :]),
        pb.PushRequest(commit=pb.PushCommit(digest=dig)),
    ]
    m.push_call(iter([x.SerializeToString() for x in msgs]), timeout=30)


def test_resumes_that_name_another_push_or_an_offset_past_it_apply_nothing(lab: Lab) -> None:
    m = lab.wide
    new = bf16_state(31, m.state)
    blob = whole(new)
    head = broken(m, blob, digest(new), 60_000)
    bad = {
        "an offset one past the bytes applied": dict(offset=60_001),
        "an offset past the payload": dict(offset=len(blob) + 10),
        "another payload size": dict(offset=60_000, payload_bytes=len(blob) + 2),
        "another writer": dict(offset=60_000, writer_id="someone"),
        "another version": dict(offset=60_000, version=head.version + 1),
        "another base": dict(offset=60_000, base_version=head.version - 1),
    }
    for what, fields in bad.items():
        offset = fields.pop("offset")
        send = lambda o=offset, f=fields: resume(m, head, blob, o, digest(new), **f)  # noqa: E731
        m.refused(send, PRECONDITION, reason="resume-mismatch", what=what)
        assert m.served().pending.bytes_received == 60_000, what  # the kept push stays
    m.refused(lambda: resume(m, head, blob, 1 << 63, digest(new)), INVALID, "resume_from")
    # a resume from 1 with other bytes: the bytes held are kept, so its digest cannot match
    other = bf16_state(32, m.state)
    m.refused(lambda: resume(m, head, whole(other), 1, digest(other)), INVALID, "digest")
    # and a push cancelled again, resumed exactly, commits the state it meant to
    head = broken(m, blob, digest(new), 70_000)
    resume(m, head, blob, 50_000, digest(new))  # a slightly stale offset is fine
    assert m.served().digest == digest(new)
    m.state = new
    # a resume under an epoch fenced since is refused as any push is
    head = broken(m, whole(other), digest(other), 40_000)
    m.lease("took-over")
    send = lambda: resume(m, head, whole(other), 40_000, digest(other))  # noqa: E731
    m.refused(send, grpc.StatusCode.ABORTED, reason="fenced")


def test_a_writer_fenced_mid_push_commits_nothing_and_the_new_writer_does(lab: Lab) -> None:
    m = lab.wide
    old_state, new_state = bf16_state(41, m.state), bf16_state(42, m.state)
    msgs = m.messages(whole(old_state), digest(old_state))
    gate = threading.Event()

    def stream() -> Iterator[bytes]:
        yield msgs[0].SerializeToString()
        yield pb.PushRequest(data=msgs[1].data[:50_000]).SerializeToString()
        gate.wait(20)
        yield pb.PushRequest(data=msgs[1].data[50_000:]).SerializeToString()
        yield msgs[-1].SerializeToString()

    before = m.served()
    future = m.push_call.future(stream(), timeout=30)
    wait_until(lambda: m.served().pending.bytes_received >= 50_000, timeout=10)
    m.lease("second-writer")
    gate.set()
    with pytest.raises(grpc.RpcError) as caught:
        future.result()
    assert caught.value.code() == grpc.StatusCode.ABORTED, caught.value.details()
    assert dict(caught.value.trailing_metadata() or ()).get("error-reason") == "fenced"
    m.unchanged(before)
    m.commit_full(new_state)
    assert m.served().writer_id == "second-writer"


def self_spellings(m: Model) -> list[str]:
    p = port(m)
    # fmt: off
    return [f"127.0.0.1:{p}", f"localhost:{p}", f"127.0.0.1:0{p}", f"[::ffff:127.0.0.1]:{p}",
            f"127.1:{p}", f"127.0.0.1:{p + 65536}", f"0.0.0.0:{p}"]  # 0.0.0.0 dials this host
    # fmt: on


def test_routes_that_loop_back_or_are_not_host_port_are_refused(lab: Lab) -> None:
    m = lab.wide
    new = changed(m.state, 51)
    blob, dig = whole(new), digest(new)
    spelled = [f"127.0.0.1:{p}" for p in range(20000, 20257)]
    second = lab.second  # a loop through another replica back to this one
    # fmt: off
    routes = [([a], a) for a in self_spellings(m)] + [
        (["127.0.0.1:0"], "127.0.0.1:0"), (["127.0.0.1"], "127.0.0.1"), ([""], "address"),
        (["unix:/tmp/x.sock"], "unix:/tmp/x.sock"), ([f"ipv4:127.0.0.1:{port(m)}"], "ipv4:"),
        ([f"dns:///127.0.0.1:{port(m)}"], "dns:"), (["127.0.0.1:1", "localhost:1"], "localhost:1"),
        (spelled, "256"), ([second.inf.sync, f"localhost:{port(m)}"], f"localhost:{port(m)}"),
        ([second.inf.sync, f"0.0.0.0:{port(m)}"], f"0.0.0.0:{port(m)}"),
    ]
    # fmt: on
    for route, fragment in routes:
        before = second.served()
        hops = [pb.Hop(address=a, writer_epoch=m.epoch) for a in route]
        if route[0] == second.inf.sync:
            hops[0].writer_epoch = second.epoch
        send = lambda h=hops: m.push(blob, dig, route=h)  # noqa: E731
        m.refused(send, INVALID, fragment, reason="malformed-push", what=route[:2])
        second.unchanged(before)


def test_a_hop_that_cannot_be_reached_is_reported_and_the_push_commits(lab: Lab) -> None:
    m = lab.wide
    new = changed(m.state, 52)
    started = time.monotonic()
    answer = m.push(whole(new), digest(new), route=[pb.Hop(address="127.0.0.1:1")])
    assert time.monotonic() - started < 10
    assert m.served().digest == digest(new)
    m.state = new
    assert [h.address for h in answer.hops] == ["127.0.0.1:1"]
    unreachable = {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
    assert answer.hops[0].version == 0 and answer.hops[0].code in unreachable, answer.hops


def test_seeds_to_itself_or_to_bad_addresses_are_refused(lab: Lab) -> None:
    m = lab.wide
    stub = m.inf.sync_stub()
    version = m.served().version

    def seed(address: str, v: int = version, model: str = "wide") -> pb.HopResult:
        request = pb.SeedRequest(
            model_name=model, version=v, hop=pb.Hop(address=address, writer_epoch=m.epoch)
        )
        return stub.Seed(request, timeout=20)

    for address in [*self_spellings(m), "127.0.0.1:0", "nope", "", "unix:/tmp/x.sock"]:
        m.refused(lambda a=address: seed(a), INVALID, address[:40], what=address)
    m.refused(lambda: seed("127.0.0.1:1", 0), INVALID)  # no version expected
    m.refused(
        lambda: seed("127.0.0.1:1", version + 1), PRECONDITION, reason="seed-version-mismatch"
    )
    m.refused(lambda: seed("127.0.0.1:1", model="nope"), grpc.StatusCode.NOT_FOUND, "nope")
    started = time.monotonic()
    result = seed("127.0.0.1:1")
    assert time.monotonic() - started < 15
    assert result.version == 0 and result.code == grpc.StatusCode.UNAVAILABLE.value[0], result
    result = seed(m.inf.data)  # a data plane: no WeightSync there
    assert result.code == grpc.StatusCode.UNIMPLEMENTED.value[0], result
    assert "WeightSync" in result.message
    # a hop under an epoch it never granted refuses, and changes nothing; its own commits
    hop = lab.second
    before = hop.served()
    request = pb.SeedRequest(model_name="wide", version=version, hop=pb.Hop(address=hop.inf.sync))
    request.hop.writer_epoch = hop.epoch + 5
    result = stub.Seed(request, timeout=20)
    assert result.version == 0 and result.reason == "unknown-epoch", result
    hop.unchanged(before)
    request.hop.writer_epoch = hop.epoch
    assert stub.Seed(request, timeout=20).version == version
    assert hop.served().digest == m.served().digest
