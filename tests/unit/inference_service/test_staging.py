"""Staging sinks write received bytes, and decode encoded ones, into the standby tensors
exactly, on CPU and on CUDA; decodes in flight are waited for."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import xxhash

from inference_service.syncplane.staging import BaseDecoder, CpuSink, CudaSink, make_sink
from shared.errors import MalformedPushError
from shared.weights.digest import tensor_hashes
from shared.weights.encoding import SPARSE, encode, host_bytes
from shared.weights.layout import TensorEntry, TensorLayout
from shared.weights.reader import PayloadReader
from shared.weights.writer import Payload
from tests.devices import devices

DEVICES = devices()


@pytest.mark.parametrize("device", DEVICES)
def test_sink_rebuilds_tensors_bit_exactly(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    source = {
        "big": torch.randn(3 << 20, generator=g),  # larger than a staging buffer
        "half": torch.randn(17, 5, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    targets = {k: torch.zeros_like(v, device=device) for k, v in source.items()}
    touched: list[str] = []
    sink = make_sink(targets, touched.append)
    assert isinstance(sink, CpuSink if device == "cpu" else CudaSink)
    payload = Payload.of(list(source.items()))
    reader = PayloadReader(payload.nbytes, {k: TensorLayout.of(v) for k, v in source.items()}, sink)
    for chunk in payload.chunks(1 << 20):
        reader.feed(chunk)
    reader.finish()
    sink.finish()
    assert sorted(touched) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(targets[name].cpu(), tensor), name


@pytest.mark.parametrize("device", DEVICES)
def test_copy_brings_an_unsent_tensor_up_to_date_before_finish_returns(device: str) -> None:
    live = torch.arange(5 << 20, dtype=torch.float32, device=device)
    standby = {"kept": torch.zeros_like(live)}
    sink = make_sink(standby, lambda _: None)
    sink.copy("kept", live)
    sink.finish()
    assert torch.equal(standby["kept"], live)


def transposed(rows: int, columns: int, device: str) -> torch.Tensor:
    """Zeros of shape (rows, columns) kept transposed in memory (`p.data = p.data.t()`)."""
    return torch.zeros(columns, rows, device=device).t()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_targets_get_their_bytes_by_every_path(device: str) -> None:
    """A tensor the model keeps transposed, written alone under its one name (received bytes),
    brought up to date from the live copy, and decoded against its base: each ends with the
    values sent, in its own layout. (Bytes written before its contiguous copy was made were
    once never copied in: the push committed and the served copy kept its old weights.)"""
    g = torch.Generator().manual_seed(2)
    sent = {"written": torch.randn(6, 5, generator=g), "kept": torch.randn(4, 3, generator=g)}
    standby = {"written": transposed(6, 5, device), "kept": transposed(4, 3, device)}
    sink = make_sink(standby, lambda _: None)
    payload = Payload.of([("written", sent["written"])])
    layouts = {"written": TensorLayout.of(sent["written"])}
    reader = PayloadReader(payload.nbytes, layouts, sink)
    for chunk in payload.chunks(16):
        reader.feed(chunk)
    reader.finish()
    sink.copy("kept", sent["kept"].to(device))
    sink.finish()
    for name, tensor in sent.items():
        assert standby[name].stride() == (1, tensor.shape[0]), name  # its layout kept
        assert torch.equal(standby[name].cpu(), tensor), name

    base = {"w": torch.randn(64, 32, generator=g).to(torch.bfloat16)}
    new = {"w": _changed(base["w"], 0.03, 0)}
    standby = {"w": transposed(64, 32, device).to(torch.bfloat16)}
    sink = make_sink(standby, lambda _: None)
    live = {"w": base["w"].to(device)}
    encoded, layouts = _encoded_push(new, base)
    reader = PayloadReader(
        encoded.nbytes, layouts, sink, decoder=BaseDecoder("m", live, sink.decode)
    )
    for chunk in encoded.chunks(1 << 10):
        reader.feed(chunk)
    reader.finish()
    sink.finish()
    assert torch.equal(standby["w"].cpu(), new["w"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_wait_for_work_queued_on_the_request_stream() -> None:
    # A request still queued on the default stream reads the standby weights (it ran on them
    # while they were live); the push's side-stream writes must land after that read.
    weights = torch.full((1 << 22,), 1.0, device="cuda")
    zeros = torch.zeros_like(weights)
    torch.cuda._sleep(200_000_000)  # type: ignore[no-untyped-call]  # keep the stream busy
    seen = weights.sum()  # queued behind the sleep, on the request stream
    sink = make_sink({"w": weights}, lambda _: None)
    sink.copy("w", zeros)
    sink.finish()
    assert seen.item() == float(1 << 22)
    assert weights.sum().item() == 0.0


def test_mixed_devices_are_refused() -> None:
    with pytest.raises(ValueError, match="one kind of device"):
        make_sink({"a": torch.zeros(1), "b": torch.zeros(1, device="meta")}, lambda _: None)


def _encoded_push(
    new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> tuple[Payload, dict[str, TensorLayout]]:
    """A delta payload of `new` with every tensor sparse-encoded against `base`."""
    encoded = {}
    for name, tensor in new.items():
        data = encode(SPARSE, host_bytes(tensor), host_bytes(base[name]), tensor.element_size())
        assert data is not None
        encoded[name] = (SPARSE, data)
    payload = Payload.of(list(new.items()), encoded=encoded)
    return payload, {k: TensorLayout.of(v) for k, v in new.items()}


def _changed(base: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    new = base.clone()
    flat = new.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[: int(flat.numel() * fraction)]
    flat[where] = torch.randn(len(where), generator=g).to(new.dtype)
    return new


@pytest.mark.parametrize("device", DEVICES)
def test_encoded_tensors_decode_into_the_standby_bit_exactly_with_their_hashes(
    device: str,
) -> None:
    g = torch.Generator().manual_seed(1)
    base = {f"w{i}": torch.randn(1 << 19, generator=g).to(torch.bfloat16) for i in range(6)} | {
        "odd": torch.randn(1001, generator=g)
    }  # past the last whole block; 4-byte words
    new = {name: _changed(t, 0.03, i) for i, (name, t) in enumerate(base.items())}
    live = {k: v.to(device) for k, v in base.items()}
    standby = {k: torch.zeros_like(v) for k, v in live.items()}
    sink = make_sink(standby, lambda _: None)
    payload, layouts = _encoded_push(new, base)
    reader = PayloadReader(
        payload.nbytes, layouts, sink, decoder=BaseDecoder("m", live, sink.decode)
    )
    for chunk in payload.chunks(1 << 16):
        reader.feed(chunk)
    hashes = reader.finish()
    sink.finish()
    assert hashes == tensor_hashes(new)
    for name, tensor in new.items():
        assert torch.equal(standby[name].cpu().view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_decode_runs_beside_the_stream_and_finish_waits_for_it() -> None:
    standby = {"w": torch.zeros(1 << 16)}
    sink = make_sink(standby, lambda _: None)
    assert isinstance(sink, CpuSink)
    release, started = threading.Event(), threading.Event()

    def slow(out: np.ndarray) -> bytes:
        started.set()
        release.wait(10)
        out[:] = 7
        return xxhash.xxh3_128_digest(out.data)

    entry = TensorEntry("w", TensorLayout.of(standby["w"]), 0, 10, SPARSE)
    decoded = sink.decode(entry, slow)  # returns while the work waits
    assert started.wait(10)
    finished = threading.Thread(target=sink.finish)
    finished.start()
    finished.join(0.2)
    assert finished.is_alive()  # an abort must not hand the standby on while it is written
    release.set()
    finished.join(10)
    assert not finished.is_alive()
    assert decoded() == xxhash.xxh3_128_digest(bytes([7]) * (4 << 16))


def test_bytes_that_do_not_decode_are_refused_when_the_push_finishes() -> None:
    g = torch.Generator().manual_seed(2)
    base = {"a": torch.randn(1 << 16, generator=g), "b": torch.randn(1 << 16, generator=g)}
    new = {name: _changed(t, 0.02, i) for i, (name, t) in enumerate(base.items())}
    payload, layouts = _encoded_push(new, base)
    raw = bytearray(b"".join(payload.chunks()))
    first = payload.entries[0]
    start = len(payload.header) + first.begin
    raw[start : start + 8] = (1 << 40).to_bytes(8, "little")  # a count past the tensor
    standby = {k: torch.zeros_like(v) for k, v in base.items()}
    sink = make_sink(standby, lambda _: None)
    reader = PayloadReader(len(raw), layouts, sink, decoder=BaseDecoder("m", base, sink.decode))
    reader.feed(bytes(raw))
    with pytest.raises(MalformedPushError, match="tensor 'a': its sparse bytes do not decode"):
        reader.finish()
    sink.finish()
