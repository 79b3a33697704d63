"""The data plane's request path: version pins, row counts and admission bounds."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch import nn

from inference_service.dataplane.admission import Admission, RequestLimits
from inference_service.dataplane.batcher import BatchingConfig
from inference_service.dataplane.service import DataPlane
from inference_service.served_model import ServedModel
from shared.app import ModelSpec, TensorSpec
from shared.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ResourceLimitError,
    VersionNotServedError,
)
from shared.weights.digest import tensor_hash
from tests.devices import NEEDS_CUDA

SPEC = ModelSpec(
    "two",
    lambda: None,  # type: ignore[arg-type,return-value]
    (TensorSpec("x", "FP32", (-1, 2)), TensorSpec("y", "FP32", (-1, 2))),
    (TensorSpec("z", "FP32", (-1, 2)),),
)


class Held(nn.Module):
    """Adds its inputs, times a scale, once `open` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.open.wait(5)
        return (x + y) * self.scale


def served() -> tuple[ServedModel, Held]:
    module = Held()
    return ServedModel(SPEC, module, lambda m, x, y: m(x, y), True, torch.device("cpu")), module


def restore(model: ServedModel, version: int, scale: float) -> None:
    """Make `version` (weights: `scale`) the live one, as a committed push would."""
    tensors = {"scale": torch.tensor(scale)}
    model.restore(tensors, version, "test", {"scale": tensor_hash(tensors["scale"])}, 0.0)


def plane(model: ServedModel, batched: bool, limits: RequestLimits | None = None) -> DataPlane:
    batching = BatchingConfig(max_batch_size=8) if batched else None
    data = DataPlane({model.name: model}, batching, workers=2, limits=limits)
    data.set_ready(True)
    return data


def test_acquire_pins_the_version_named_or_refuses_naming_the_served_one() -> None:
    model, _ = served()
    with model.acquire(0) as generation:
        assert generation.version == 0
    restore(model, 3, 2.0)
    refused = pytest.raises(VersionNotServedError, match="version 0 is not served; version 3 is")
    with refused, model.acquire(0):
        pass
    with model.acquire(3) as generation:
        assert generation.version == 3


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_infer_runs_on_the_version_named_or_fails(batched: bool) -> None:
    model, _ = served()
    data = plane(model, batched)
    restore(model, 2, 3.0)
    inputs = [torch.ones(1, 2), torch.ones(1, 2)]
    (z,), generation = asyncio.run(data.infer(model, inputs, version="2"))
    assert generation.version == 2 and torch.equal(torch.as_tensor(z), torch.full((1, 2), 6.0))
    for named, shown in (("1", "1"), ("two", "'two'")):
        with pytest.raises(VersionNotServedError, match=f"version {shown} is not served"):
            asyncio.run(data.infer(model, inputs, version=named))
    data.close()


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("left_s", [0.0, -0.001], ids=["none-left", "passed"])
def test_a_request_whose_deadline_passed_before_it_ran_is_dropped_unrun(
    batched: bool, left_s: float
) -> None:
    """A caller whose deadline passed on its way in (grpc.aio's time_remaining() says 0 or
    less) is not answered: the model must not run for it (found by an outside review)."""
    model, module = served()
    data = plane(model, batched)
    with pytest.raises(DeadlineExceededError, match="deadline passed while it queued"):
        asyncio.run(data.infer(model, [torch.ones(1, 2), torch.ones(1, 2)], timeout_s=left_s))
    assert not module.entered.is_set() and data.admission.in_flight("two") == 0
    data.close()


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_inputs_with_different_row_counts_are_refused_before_they_queue(batched: bool) -> None:
    model, module = served()
    data = plane(model, batched)
    module.open.clear()  # nothing may run: the refusal comes first
    with pytest.raises(InvalidInputError, match=r"'x' 1, 'y' 0"):
        asyncio.run(data.infer(model, [torch.ones(1, 2), torch.ones(0, 2)]))
    assert not module.entered.is_set() and data.admission.in_flight("two") == 0
    module.open.set()
    data.close()


def test_admission_bounds_requests_per_model_and_bytes_per_service() -> None:
    admission = Admission(RequestLimits(max_requests_per_model=2, max_bytes=100))
    first, _ = admission.admit("a", 10), admission.admit("a", 10)
    with pytest.raises(ResourceLimitError, match="model 'a': 2 requests are in flight"):
        admission.admit("a", 0)
    admission.admit("b", 80)  # another model's own count; the bytes are the service's
    with pytest.raises(ResourceLimitError, match="hold 100 bytes of tensors; this one's 1 "):
        admission.admit("b", 1)
    with pytest.raises(ResourceLimitError, match="101 bytes, more than all requests"):
        admission.admit("c", 101)
    first.release()
    first.release()  # once only
    assert admission.in_flight("a") == 1 and admission.bytes_in_flight == 90


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_a_request_its_caller_abandoned_holds_its_place_until_its_model_has_run(
    batched: bool,
) -> None:
    model, module = served()
    data = plane(model, batched, limits=RequestLimits(max_requests_per_model=1))
    module.open.clear()

    async def abandon() -> None:
        call = asyncio.ensure_future(data.infer(model, [torch.ones(1, 2), torch.ones(1, 2)]))
        while not module.entered.is_set():
            await asyncio.sleep(0.001)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(ResourceLimitError, match="1 requests are in flight"):
            await data.infer(model, [torch.ones(1, 2), torch.ones(1, 2)])

    asyncio.run(abandon())
    module.open.set()
    data.close()  # waits for the worker
    assert data.admission.in_flight("two") == 0 and data.admission.bytes_in_flight == 0


def test_a_batched_request_cancelled_while_queued_is_dropped_unrun_and_gives_its_place_back() -> (
    None
):
    seen: list[int] = []  # rows of each batch the model ran
    module = Held()

    def run(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(int(x.shape[0]))
        out: torch.Tensor = m(x, y)
        return out

    model = ServedModel(SPEC, module, run, True, torch.device("cpu"))
    data = plane(model, batched=True)
    module.open.clear()

    async def scenario() -> None:
        first = asyncio.ensure_future(data.infer(model, [torch.ones(1, 2), torch.ones(1, 2)]))
        while not module.entered.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(data.infer(model, [torch.ones(3, 2), torch.ones(3, 2)]))
        while data.admission.in_flight("two") < 2:  # until it has queued behind the first
            await asyncio.sleep(0.001)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        module.open.set()
        (z,), _ = await first
        assert torch.equal(torch.as_tensor(z), torch.full((1, 2), 2.0))
        (z,), _ = await data.infer(model, [torch.ones(2, 2), torch.full((2, 2), 2.0)])
        assert torch.equal(torch.as_tensor(z), torch.full((2, 2), 3.0))

    asyncio.run(scenario())
    data.close()
    assert seen == [1, 2]  # the cancelled request's three rows never ran
    assert data.admission.in_flight("two") == 0 and data.admission.bytes_in_flight == 0


def on_device(device: str) -> ServedModel:
    """A model that runs on `device` and returns its result there (no weights: "meta" has no
    data to hash)."""
    return ServedModel(SPEC, nn.Module(), lambda m, x, y: x + y, True, torch.device(device))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_outputs_leave_the_device_on_the_models_thread(batched: bool) -> None:
    # With no GPU, "meta" stands for the model's device. Its tensors hold no data, so the copy
    # to host memory fails: the failure must come back through the model's own future, raised
    # where the model ran, instead of meta outputs reaching the event loop to be encoded there.
    # (It shows where the copy happens, not that a real device's bytes arrive: the CUDA test.)
    model = on_device("meta")
    data = plane(model, batched)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        asyncio.run(data.infer(model, [torch.ones(1, 2), torch.ones(1, 2)]))
    data.close()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_outputs_reach_the_event_loop_in_host_memory(batched: bool, device: str) -> None:
    model = on_device(device)
    data = plane(model, batched)
    (z,), _ = asyncio.run(data.infer(model, [torch.ones(3, 2), torch.full((3, 2), 2.0)]))
    assert isinstance(z, torch.Tensor) and z.device.type == "cpu"
    assert torch.equal(torch.as_tensor(z), torch.full((3, 2), 3.0))
    data.close()
