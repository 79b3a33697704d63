"""Staging sinks write received bytes into the standby tensors exactly, on CPU and on CUDA."""

from __future__ import annotations

import pytest
import torch

from inference_service.syncplane.staging import CpuSink, CudaSink, make_sink
from shared.weights.layout import TensorLayout
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
