"""The staging transaction a push fills a model's standby copy through: a commit swaps in exactly
what was staged; any failure aborts it, and after an abort nothing has changed: the live weights,
their version and digest, the push slot, the history writer's copy, and what a later push may
trust of the standby copy."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

from inference_service.served_model import PendingPush, ServedModel
from inference_service.syncplane.transaction import StagingTransaction
from shared.app import ModelSpec, TensorSpec
from shared.errors import ConflictError, FencedError, MalformedPushError, UnavailableError
from shared.weights.digest import state_digest
from shared.weights.layout import TensorEntry, TensorLayout
from shared.weights.reader import PayloadReader
from shared.weights.writer import Payload
from tests.devices import devices

SPEC = ModelSpec(
    "m",
    lambda: None,
    (TensorSpec("x", "FP32", (-1, 3)),),  # type: ignore[arg-type,return-value]
    (TensorSpec("y", "FP32", (-1, 2)),),
)
DEVICES = devices()


def new_module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def served(device: str = "cpu") -> ServedModel:
    torch.manual_seed(0)
    module = new_module().to(device)
    return ServedModel(SPEC, module, lambda m, x: m(x), True, torch.device(device))


def trained(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in new_module().state_dict().items()}


def begin(model: ServedModel, version: int = 1, drain_timeout_s: float = 0.5) -> StagingTransaction:
    return model.begin_push(PendingPush("t", version, 0, 0), drain_timeout_s)


def stage(
    model: ServedModel, staging: StagingTransaction, tensors: dict[str, torch.Tensor]
) -> dict[str, bytes]:
    """Write `tensors` through the transaction as a push's payload; their hashes."""
    payload = Payload.of(list(tensors.items()))
    reader = PayloadReader(payload.nbytes, model.layout, staging)
    for chunk in payload.chunks(16):
        reader.feed(chunk)
    return reader.finish()


def commit(model: ServedModel, tensors: dict[str, torch.Tensor], version: int) -> None:
    """A whole push of `tensors` (a delta when they are not all of them)."""
    with begin(model, version) as staging:
        hashes = staging.complete(stage(model, staging, tensors))
        staging.commit(version, "t", hashes)


def live_state(model: ServedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.live.module.state_dict().items()}


def assert_live(model: ServedModel, state: dict[str, torch.Tensor], version: int) -> None:
    assert model.live.version == version
    assert model.live.digest == state_digest(state)
    live = live_state(model)
    assert live.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(live[name], tensor.cpu()), name


@pytest.mark.parametrize("device", DEVICES)
def test_a_commit_swaps_in_exactly_what_was_staged_and_frees_the_slot(device: str) -> None:
    model = served(device)
    old = model.live
    state = trained(1)
    with begin(model) as staging:
        assert model.pending is not None and model.pending.version == 1
        assert staging.live is old
        hashes = staging.complete(stage(model, staging, state))
        assert model.live is old  # nothing is served from the staged copy before the commit
        generation = staging.commit(1, "t", hashes)
    assert model.live is generation and generation.writer_id == "t"
    assert_live(model, state, 1)
    assert model.pending is None
    state["2.bias"] = state["2.bias"] + 1  # a delta onto the copy that was live before
    commit(model, {"2.bias": state["2.bias"]}, 2)
    assert_live(model, state, 2)
    assert model.live.module is old.module  # the two copies take turns


def fail_writing(model: ServedModel, staging: StagingTransaction) -> None:
    stage(model, staging, {"0.weight": torch.full((4, 3), 7.0)})
    raise MalformedPushError("the push stream ended without a commit")


def fail_overrunning(model: ServedModel, staging: StagingTransaction) -> None:
    entry = TensorEntry("0.weight", TensorLayout("F32", (4, 3)), 0, 48)
    staging.write(entry, 40, memoryview(bytes(16)))  # past the tensor's end: the sink refuses


def fail_at_the_digest(model: ServedModel, staging: StagingTransaction) -> None:
    staging.complete(stage(model, staging, trained(5)))
    raise MalformedPushError("digest mismatch")


def fail_fenced_at_the_commit(model: ServedModel, staging: StagingTransaction) -> None:
    hashes = staging.complete(stage(model, staging, trained(5)))
    model.lease.grant("b")  # another writer acquires the model before the swap
    with model.lease.fenced(0, "t"):
        staging.commit(1, "t", hashes)


def leave_without_a_commit(model: ServedModel, staging: StagingTransaction) -> None:
    staging.complete(stage(model, staging, trained(5)))


Raised = type[Exception] | tuple[type[Exception], ...] | None
FAILURES: list[tuple[Callable[[ServedModel, StagingTransaction], None], Raised]] = [
    (fail_writing, MalformedPushError),
    (fail_overrunning, (ValueError, RuntimeError)),  # the CPU sink's check; CUDA's copy_
    (fail_at_the_digest, MalformedPushError),
    (fail_fenced_at_the_commit, FencedError),
    (leave_without_a_commit, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("fail", "raised"), FAILURES, ids=[f.__name__ for f, _ in FAILURES])
def test_a_push_that_fails_anywhere_changes_nothing(
    device: str,
    fail: Callable[[ServedModel, StagingTransaction], None],
    raised: Raised,
) -> None:
    model = served(device)
    state = trained(1)
    commit(model, state, 1)
    commit(model, state, 2)  # both copies hold `state` now, and know it
    before = model.live
    generation, count = model.snapshot()  # as the history writer starts copying version 2
    staging = begin(model, 3)
    if raised is None:
        with staging:
            fail(model, staging)
    else:
        with pytest.raises(raised), staging:
            fail(model, staging)
    assert model.live is before
    assert_live(model, state, 2)
    assert model.pending is None
    with model.unchanged(generation, count) as unchanged:
        assert unchanged  # the live copy was never handed over: the history writer goes on
    # The standby copy's written tensors are not trusted: a delta that leaves them out gets
    # them from the live copy, and serves exactly the state it means.
    state["2.bias"] = state["2.bias"] - 1
    commit(model, {"2.bias": state["2.bias"]}, 3)
    assert_live(model, state, 3)


def test_a_push_that_cannot_start_leaves_the_slot_free() -> None:
    model = served()
    commit(model, trained(1), 1)  # the standby copy is version 0's module now
    with model.acquire():  # a request still runs on version 1
        commit(model, trained(2), 2)  # fills version 0's copy: fine
        with pytest.raises(UnavailableError, match=r"did not finish within 0\.1s"):
            begin(model, 3, drain_timeout_s=0.1)  # would overwrite the pinned copy
        assert model.pending is None
    commit(model, trained(3), 3)
    assert_live(model, trained(3), 3)


def test_a_second_push_is_refused_while_one_holds_the_slot() -> None:
    model = served()
    with begin(model, 1) as first:
        with pytest.raises(ConflictError, match=r"another push from 't' \(version 1\)"):
            begin(model, 2)
        hashes = first.complete(stage(model, first, trained(1)))
        first.commit(1, "t", hashes)
    assert_live(model, trained(1), 1)
    held = threading.Event()
    released = threading.Event()

    def hold() -> None:
        with begin(model, 2):
            held.set()
            released.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        with pytest.raises(ConflictError, match=r"another push from 't' \(version 2\)"):
            begin(model, 3)
    finally:
        released.set()
        holder.join()
    commit(model, trained(3), 3)  # the slot was let go when the holder left without a commit
    assert_live(model, trained(3), 3)


@pytest.mark.parametrize(
    "returns",
    [lambda m: m[2].bias, lambda m: m[2].weight[0], lambda m: (m[0].weight.T, m[2].bias + 0)],
    ids=["a parameter", "a view of one", "a view among outputs"],
)
def test_outputs_that_are_the_weights_keep_the_version_they_ran_on_after_pushes(
    returns: Callable[[nn.Module], object],
) -> None:
    # An answer is encoded after its weights are let go; an output sharing their memory would
    # show whatever a later push wrote there.
    torch.manual_seed(0)
    model = ServedModel(SPEC, new_module(), lambda m, x: returns(m), True, torch.device("cpu"))
    result, generation = model.infer([torch.ones(1, 3)])
    outputs = list(result) if isinstance(result, tuple) else [result]
    expected = [t.clone() for t in outputs]
    assert generation.version == 0
    commit(model, trained(1), 1)
    commit(model, trained(2), 2)  # both copies overwritten now
    for output, before in zip(outputs, expected, strict=True):
        assert torch.equal(output, before)
