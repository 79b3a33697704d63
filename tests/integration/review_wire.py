"""What the outside review of the sync plane's wire builds its pushes from, byte by byte.

Everything here is built from the docs only (docs/sync.md, docs/status-codes.md,
proto/weightsync/v1/weightsync.proto): the safetensors framing, `weightsync.encodings`
(sparse gap-coded positions + values, xor + lz4, xor + zstd), `weightsync.tied`, resume
offsets, routes and Seed. No product encoder or writer is used; the digest (xxh3_128 over
name, dtype, shape and each tensor's xxh3_128) is computed here too. Each bad push must get the
documented status with a message naming the problem, leave the served version and digest as
they were, keep the service answering ModelInfer, and not blow its memory up
(`Model.refused`). The tests are test_review_wire_encodings.py, test_review_wire_ties.py and
test_review_wire_routes.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
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
from tests.integration.conftest import Inference, Services

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


@contextlib.contextmanager
def opened_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The services of one test module, stopped when it ends."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with Services(tmp_path_factory.mktemp("review_wire"), env) as services:
        yield Lab(services)


def port(model: Model) -> int:
    return int(model.inf.sync.rsplit(":", 1)[1])
