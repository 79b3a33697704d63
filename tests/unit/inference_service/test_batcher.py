"""Dynamic batching: requests join into one run on one version, limits answer clearly."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch
from torch import nn

from inference_service.dataplane.batcher import Batcher, BatchingConfig, Result
from inference_service.dataplane.model_io import normalize_model_outputs
from inference_service.served_model import ServedModel
from shared.app import ModelSpec, TensorSpec
from shared.errors import DeadlineExceededError, UnavailableError, VersionNotServedError
from shared.weights.digest import tensor_hash

SPEC = ModelSpec(
    "m", lambda: None, (TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 2)),)
)  # type: ignore[arg-type,return-value]


class Gate(nn.Module):
    """Doubles its input; records batch sizes; can be held shut to let a queue build up."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.batches: list[int] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.open.wait(5)
        self.batches.append(int(x.shape[0]))
        return x * self.scale


def batcher(config: BatchingConfig) -> tuple[Batcher, Gate]:
    gate = Gate()
    model = ServedModel(SPEC, gate, lambda m, x: m(x), True, torch.device("cpu"))
    return Batcher(model, config, normalize_model_outputs), gate


def test_concurrent_requests_share_a_run_and_get_their_own_rows_back() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=64, max_queue_delay_s=0.05))
    gate.open.clear()
    first = runner.submit([torch.zeros(1, 2)], None)  # occupies the model
    assert gate.entered.wait(5)
    futures: list[Future[Result]] = [
        runner.submit([torch.full((i + 1, 2), float(i))], None) for i in range(5)
    ]
    gate.open.set()
    first.result(5)
    for i, future in enumerate(futures):
        (out,), generation = future.result(5)
        assert torch.equal(torch.as_tensor(out), torch.full((i + 1, 2), 2.0 * i))
        assert generation.version == 0
    assert gate.batches[1] == 15  # 1 + 2 + 3 + 4 + 5 rows, in one run
    runner.close()


def test_a_full_queue_answers_unavailable_at_once() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=1, max_queue=2))
    gate.open.clear()
    runner.submit([torch.zeros(1, 2)], None)
    assert gate.entered.wait(5)  # the worker holds the first; two more fill the queue
    runner.submit([torch.zeros(1, 2)], None)
    runner.submit([torch.zeros(1, 2)], None)
    with pytest.raises(UnavailableError, match=r"the request queue is full \(2\)"):
        runner.submit([torch.zeros(1, 2)], None)
    gate.open.set()
    runner.close()


def test_requests_whose_deadline_passed_while_queued_are_dropped_unrun() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=1))
    gate.open.clear()
    runner.submit([torch.zeros(1, 2)], None)
    assert gate.entered.wait(5)
    late = runner.submit([torch.zeros(3, 2)], timeout_s=0.01)
    time.sleep(0.05)
    gate.open.set()
    with pytest.raises(DeadlineExceededError, match="deadline passed while it queued"):
        late.result(5)
    time.sleep(0.05)
    assert 3 not in gate.batches
    runner.close()


def test_a_request_its_caller_cancelled_is_dropped_unrun_and_the_batcher_goes_on() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=64, max_queue_delay_s=0.01))
    gate.open.clear()
    first = runner.submit([torch.zeros(1, 2)], None)  # occupies the model
    assert gate.entered.wait(5)
    gone = runner.submit([torch.zeros(3, 2)], None)
    assert gone.cancel()  # the client went away (grpc.aio cancels the awaiting task)
    kept = runner.submit([torch.ones(2, 2)], None)
    gate.open.set()
    first.result(5)
    (out,), _ = kept.result(5)
    assert torch.equal(torch.as_tensor(out), torch.full((2, 2), 2.0))
    assert 3 not in gate.batches and 5 not in gate.batches  # the cancelled rows never ran
    runner.close()


def test_a_lone_request_runs_at_once_rather_than_waiting_out_the_delay() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=64, max_queue_delay_s=600))
    (out,), _ = runner.submit([torch.ones(1, 2)], None).result(30)  # long before the delay
    assert torch.equal(torch.as_tensor(out), torch.full((1, 2), 2.0))
    assert gate.batches == [1]
    runner.close()


def test_once_requests_arrive_together_the_batcher_waits_to_gather_them() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=2, max_queue_delay_s=600))
    gate.open.clear()
    first = runner.submit([torch.zeros(1, 2)], None)  # runs alone, at once
    assert gate.entered.wait(5)
    together = [runner.submit([torch.zeros(1, 2)], None) for _ in range(2)]  # queue up behind
    gate.open.set()
    for future in [first, *together]:
        future.result(30)
    assert gate.batches == [1, 2]
    # the last batch held two requests, so the next request waits for company (here until the
    # batch is full, long before the delay) instead of running alone
    early = runner.submit([torch.ones(1, 2)], None)
    time.sleep(0.2)
    assert not early.done()
    late = runner.submit([torch.full((1, 2), 3.0)], None)
    (out_early,), _ = early.result(30)
    (out_late,), _ = late.result(30)
    assert torch.equal(torch.as_tensor(out_early), torch.full((1, 2), 2.0))
    assert torch.equal(torch.as_tensor(out_late), torch.full((1, 2), 6.0))
    assert gate.batches == [1, 2, 2]
    runner.close()


RAGGED = ModelSpec(
    "r", lambda: None, (TensorSpec("x", "FP32", (-1, -1)),), (TensorSpec("y", "FP32", (-1, -1)),)
)  # type: ignore[arg-type,return-value]


def test_requests_of_other_sizes_beyond_the_first_dimension_wait_for_a_batch_of_their_own() -> None:
    gate = Gate()
    model = ServedModel(RAGGED, gate, lambda m, x: m(x), True, torch.device("cpu"))
    runner = Batcher(model, BatchingConfig(max_batch_size=64), normalize_model_outputs)
    gate.open.clear()
    first = runner.submit([torch.zeros(1, 3)], None)  # occupies the model
    assert gate.entered.wait(5)
    inputs = [torch.full((1, 3), 1.0), torch.full((2, 5), 2.0), torch.full((3, 3), 3.0)]
    futures = [runner.submit([x], None) for x in inputs]
    gate.open.set()
    first.result(5)
    for x, future in zip(inputs, futures, strict=True):
        (out,), _ = future.result(5)
        assert torch.equal(torch.as_tensor(out), x * 2)
    assert gate.batches == [1, 4, 2]  # the 3-wide ones together, in order, then the 5-wide one
    runner.close()


def restore(model: ServedModel, version: int, scale: float) -> None:
    """Make `version` (weights: `scale`) the live one, as a committed push would."""
    tensors = {"scale": torch.tensor(scale)}
    hashes = {k: tensor_hash(v) for k, v in tensors.items()}
    model.restore(tensors, version, "test", hashes, 0.0)


def test_a_request_naming_a_version_runs_in_a_batch_only_on_that_version() -> None:
    runner, gate = batcher(BatchingConfig(max_batch_size=64))
    gate.open.clear()
    first = runner.submit([torch.zeros(1, 2)], None)  # occupies the model, on version 0
    assert gate.entered.wait(5)
    stale = runner.submit([torch.ones(1, 2)], None, version=0)
    current = runner.submit([torch.ones(2, 2)], None, version=1)
    latest = runner.submit([torch.ones(3, 2)], None)
    restore(runner.model, 1, 3.0)  # a push commits version 1 while they queue
    gate.open.set()
    first.result(5)
    with pytest.raises(VersionNotServedError, match="version 0 is not served; version 1 is"):
        stale.result(5)
    for future, rows in ((current, 2), (latest, 3)):
        (out,), generation = future.result(5)
        assert generation.version == 1
        assert torch.equal(torch.as_tensor(out), torch.full((rows, 2), 3.0))
    assert gate.batches == [1, 5]  # the stale request never ran
    runner.close()


def test_a_batch_whose_outputs_lack_a_row_per_input_row_fails_rather_than_mixing_rows() -> None:
    model = ServedModel(SPEC, Gate(), lambda m, x: m(x)[:-1], True, torch.device("cpu"))
    runner = Batcher(model, BatchingConfig(max_batch_size=64), normalize_model_outputs)
    gate = model.live.module
    assert isinstance(gate, Gate)
    gate.open.clear()
    first = runner.submit([torch.zeros(2, 2)], None)
    assert gate.entered.wait(5)
    together = [runner.submit([torch.ones(1, 2)], None) for _ in range(2)]
    gate.open.set()
    (alone,), _ = first.result(5)  # alone, its one row short is its own
    assert alone.shape == (1, 2)
    for future in together:
        with pytest.raises(RuntimeError, match="must return one row per input row"):
            future.result(5)
    runner.close()
