"""A catalogue of malformed input on both planes: each gets its status code and a message naming
the problem, and the served weights stay bit-identical (same version, same digest) afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from shared.gen.inference import grpc_service_pb2 as oip
from tests.integration.catalogue import MB, Bench, assert_untouched, serving_bench

OK = grpc.StatusCode


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    yield from serving_bench(tmp_path_factory.mktemp("catalogue"))


def entry(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


PER = MB * (1 << 20) // 4 // 8
SIZE = PER * 4

# (name, messages builder, expected code, message fragment)
PUSHES: list[tuple[str, Callable[[Bench], list[bytes]], grpc.StatusCode, str]] = [
    ("empty stream", lambda b: [], OK.INVALID_ARGUMENT, "empty push stream"),
    ("data first", lambda b: [b.data_msg(b"x")], OK.INVALID_ARGUMENT, "must be a header, not data"),
    (
        "commit first",
        lambda b: [b.commit(b"")],
        OK.INVALID_ARGUMENT,
        "must be a header, not commit",
    ),
    (
        "not protobuf",
        lambda b: [b"\xff\xff\xff\xff"],
        OK.INVALID_ARGUMENT,
        "not a valid weightsync",
    ),
    ("no model name", lambda b: [b.header(model_name="")], OK.INVALID_ARGUMENT, "names no model"),
    ("version 0", lambda b: [b.header(version=0)], OK.INVALID_ARGUMENT, "at least 1"),
    ("base not older", lambda b: [b.header(base_version=2)], OK.INVALID_ARGUMENT, "must be older"),
    (
        "unknown model",
        lambda b: [b.header(model_name="nope")],
        OK.NOT_FOUND,
        "no model named 'nope'",
    ),
    (
        "inference-only",
        lambda b: [b.header(model_name="frozen")],
        OK.FAILED_PRECONDITION,
        "inference-only",
    ),
    (
        "stale version",
        lambda b: [b.header(version=1)],
        OK.ABORTED,
        "is not newer than the served version 1",
    ),
    ("fenced writer", lambda b: [b.header(writer_epoch=b.epoch - 1)], OK.ABORTED, "is fenced"),
    (
        "missing base",
        lambda b: (
            [b.header(base_version=1, version=9)]
            if False
            else [b.header(version=9, base_version=7)]
        ),
        OK.FAILED_PRECONDITION,
        "applies to version 7",
    ),
    (
        "payload under 8 bytes",
        lambda b: [b.header(payload_bytes=3)],
        OK.INVALID_ARGUMENT,
        "at least 8 bytes",
    ),
    (
        "payload over the limit",
        lambda b: [b.header(payload_bytes=64 << 20)],
        OK.RESOURCE_EXHAUSTED,
        "exceeds the 33554432-byte limit",
    ),
    (
        "header over the limit",
        lambda b: [b.header(payload_bytes=1 << 20), b.data_msg((1 << 19).to_bytes(8, "little"))],
        OK.RESOURCE_EXHAUSTED,
        "exceeds the 65536-byte limit",
    ),
    (
        "header past the payload",
        lambda b: [b.header(payload_bytes=100), b.data_msg((500).to_bytes(8, "little"))],
        OK.INVALID_ARGUMENT,
        "exceeds the 100-byte payload",
    ),
    (
        "header not JSON",
        lambda b: [b.header(payload_bytes=13), b.data_msg((5).to_bytes(8, "little") + b"{nope")],
        OK.INVALID_ARGUMENT,
        "not valid JSON",
    ),
    (
        "header a list",
        lambda b: b.raw_header([1], b""),
        OK.INVALID_ARGUMENT,
        "must be a JSON object",
    ),
    (
        "bad metadata",
        lambda b: b.raw_header({"__metadata__": {"a": 1}}, b""),
        OK.INVALID_ARGUMENT,
        "__metadata__ must map strings",
    ),
    (
        "unknown tensor",
        lambda b: b.raw_header({"parts.9": entry([PER], 0, SIZE)}, bytes(SIZE)),
        OK.INVALID_ARGUMENT,
        "unknown tensor 'parts.9'",
    ),
    (
        "wrong dtype",
        lambda b: b.raw_header({"parts.0": entry([PER], 0, SIZE // 2, "F16")}, bytes(SIZE // 2)),
        OK.INVALID_ARGUMENT,
        "dtype 'F16' but the model has F32",
    ),
    (
        "wrong shape",
        lambda b: b.raw_header({"parts.0": entry([PER // 2, 2], 0, SIZE)}, bytes(SIZE)),
        OK.INVALID_ARGUMENT,
        "but the model has [32768]",
    ),
    (
        "offsets span wrong",
        lambda b: b.raw_header({"parts.0": entry([PER], 0, 8)}, bytes(8)),
        OK.INVALID_ARGUMENT,
        "span 8 bytes",
    ),
    (
        "offsets reversed",
        lambda b: b.raw_header({"parts.0": entry([PER], SIZE, 0)}, bytes(SIZE)),
        OK.INVALID_ARGUMENT,
        "is not [begin, end)",
    ),
    (
        "offsets overlap",
        lambda b: b.raw_header(
            {"parts.0": entry([PER], 0, SIZE), "parts.1": entry([PER], SIZE - 4, 2 * SIZE - 4)},
            bytes(2 * SIZE - 4),
        ),
        OK.INVALID_ARGUMENT,
        "overlaps the previous tensor",
    ),
    (
        "offsets leave a gap",
        lambda b: b.raw_header({"parts.0": entry([PER], 4, SIZE + 4)}, bytes(SIZE + 4)),
        OK.INVALID_ARGUMENT,
        "leaves a gap",
    ),
    (
        "offsets beyond the data",
        lambda b: b.raw_header({"parts.0": entry([PER], 0, SIZE)}, bytes(SIZE - 4)),
        OK.INVALID_ARGUMENT,
        "describes 131072 data bytes but the push carries 131068",
    ),
    (
        "entry missing fields",
        lambda b: b.raw_header({"parts.0": {"dtype": "F32"}}, b""),
        OK.INVALID_ARGUMENT,
        "exactly dtype, shape and data_offsets",
    ),
    (
        "full push missing tensors",
        lambda b: [
            b.header(payload_bytes=len(p := b.payload({"parts.0": b.changed()["parts.0"]}))),
            b.data_msg(p),
            b.commit(b.good_digest()),
        ],
        OK.INVALID_ARGUMENT,
        "must carry every tensor",
    ),
    (
        "stream ends without commit",
        lambda b: [b.header(), b.data_msg(b.payload())],
        OK.INVALID_ARGUMENT,
        "without a commit",
    ),
    (
        "payload cut short",
        lambda b: [b.header(), b.data_msg(b.payload()[:-5]), b.commit(b.good_digest())],
        OK.INVALID_ARGUMENT,
        "ended after",
    ),
    (
        "more bytes than announced",
        lambda b: [b.header(), b.data_msg(b.payload() + b"xx")],
        OK.INVALID_ARGUMENT,
        "more than the",
    ),
    (
        "digest mismatch",
        lambda b: [b.header(), b.data_msg(b.payload()), b.commit(b"\0" * 16)],
        OK.INVALID_ARGUMENT,
        "digest mismatch",
    ),
    (
        "message after commit",
        lambda b: [
            b.header(),
            b.data_msg(b.payload()),
            b.commit(b.good_digest()),
            b.data_msg(b"x"),
        ],
        OK.INVALID_ARGUMENT,
        "must come last",
    ),
    (
        "second header",
        lambda b: [b.header(), b.header()],
        OK.INVALID_ARGUMENT,
        "unexpected header message",
    ),
    (
        "oversized message",
        lambda b: [b.header(), b.data_msg(bytes(20 << 20))],
        OK.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
]


@pytest.mark.parametrize(
    ("messages", "code", "fragment"), [p[1:] for p in PUSHES], ids=[p[0] for p in PUSHES]
)
def test_bad_push(
    bench: Bench, messages: Callable[[Bench], list[bytes]], code: grpc.StatusCode, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        bench.push_raw(iter(messages(bench)), timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in (caught.value.details() or "")
    assert_untouched(bench)


def infer_request(**fields: object) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="stamp", **fields)  # type: ignore[arg-type]
    return request


def raw_input(
    datatype: str = "FP32", shape: tuple[int, ...] = (1, 8), data: bytes | None = None
) -> oip.ModelInferRequest:
    request = infer_request()
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(bytes(32) if data is None else data)
    return request


def with_typed_too() -> oip.ModelInferRequest:
    request = raw_input()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 8)
    return request


def unknown_output() -> oip.ModelInferRequest:
    request = raw_input()
    request.outputs.add(name="nope")
    return request


INFERS: list[tuple[str, Callable[[], oip.ModelInferRequest], grpc.StatusCode, str]] = [
    (
        "unknown model",
        lambda: oip.ModelInferRequest(model_name="nope"),
        OK.NOT_FOUND,
        "no model named 'nope'",
    ),
    (
        "version not served",
        lambda: infer_request(model_version="99"),
        OK.NOT_FOUND,
        "version 99 is not served",
    ),
    ("no inputs", lambda: infer_request(), OK.INVALID_ARGUMENT, "missing input(s) x"),
    (
        "wrong byte count",
        lambda: raw_input(data=bytes(31)),
        OK.INVALID_ARGUMENT,
        "31 raw bytes but FP32[1, 8] needs 32",
    ),
    (
        "wrong datatype",
        lambda: raw_input("FP64", data=bytes(64)),
        OK.INVALID_ARGUMENT,
        "datatype 'FP64' but the model takes FP32",
    ),
    ("unknown datatype", lambda: raw_input("FLOAT"), OK.INVALID_ARGUMENT, "datatype 'FLOAT'"),
    (
        "wrong shape",
        lambda: raw_input(shape=(1, 9), data=bytes(36)),
        OK.INVALID_ARGUMENT,
        "does not fit the model's [-1, 8]",
    ),
    ("raw and typed mixed", with_typed_too, OK.INVALID_ARGUMENT, "use one form for all inputs"),
    ("unknown output", unknown_output, OK.INVALID_ARGUMENT, "unknown output 'nope'"),
    (
        "oversized request",
        lambda: raw_input(shape=(1 << 21, 8), data=bytes(64 << 20)),
        OK.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
]


@pytest.mark.parametrize(
    ("request_of", "code", "fragment"), [i[1:] for i in INFERS], ids=[i[0] for i in INFERS]
)
def test_bad_inference_request(
    bench: Bench,
    request_of: Callable[[], oip.ModelInferRequest],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        bench.data.ModelInfer(request_of(), timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in (caught.value.details() or "")
    assert_untouched(bench)


def test_a_sender_that_stalls_after_its_header_still_gets_the_refusal(bench: Bench) -> None:
    """The refusal reaches a sender that keeps its stream open and sends nothing more, through
    the sync relay too, rather than its deadline (DEADLINE_EXCEEDED) or nothing at all."""
    release = threading.Event()

    def stalls() -> Iterator[bytes]:
        yield bench.header(model_name="nope")
        release.wait(60)

    try:
        with pytest.raises(grpc.RpcError) as caught:
            bench.push_raw(stalls(), timeout=30)
    finally:
        release.set()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    assert "nope" in (caught.value.details() or "")
    assert_untouched(bench)


def test_after_the_catalogue_nothing_failed_inside_and_a_good_push_still_works(
    bench: Bench,
) -> None:
    """Runs after every case above on the same service: the service logged no traceback and
    answered no request INTERNAL (each refusal was a domain error), and it still commits."""
    log = bench.inference.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    metrics = bench.inference.metrics()
    assert 'code="INTERNAL"' not in metrics
    refused = [
        line
        for line in metrics.splitlines()
        if line.startswith("weightsync_inference_requests_total")
    ]
    assert any('code="INVALID_ARGUMENT"' in line for line in refused), refused
    payload = bench.payload()
    response = bench.push_raw(
        iter(
            [
                bench.header(version=bench.served.version + 1),
                bench.data_msg(payload),
                bench.commit(bench.good_digest()),
            ]
        ),
        timeout=30,
    )
    assert response.version == bench.served.version + 1
    means = bench.data.ModelInfer(raw_input(), timeout=10)
    values = np.frombuffer(means.raw_output_contents[0], np.float32)
    assert values.tolist() == [100.0 + i for i in range(8)]
    bench.served = bench.inference.model_state("stamp")
