"""Pushes applied in process: what commits, what is refused, and that refusals lose nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from inference_service.served_model import ServedModel
from inference_service.syncplane.limits import SyncLimits
from inference_service.syncplane.parts import Commit, PushHeader
from inference_service.syncplane.service import SyncPlane
from shared.app import ModelSpec, TensorSpec
from shared.errors import (
    BaseVersionMismatchError,
    ConflictError,
    FencedError,
    InferenceOnlyModelError,
    MalformedPushError,
    ModelNotFoundError,
    OutOfRangeError,
    ResourceLimitError,
    UnavailableError,
    UnknownEpochError,
)
from shared.weights.digest import state_digest
from shared.weights.writer import Payload

SPEC = ModelSpec(
    "m",
    lambda: None,
    (TensorSpec("x", "FP32", (-1, 3)),),  # type: ignore[arg-type,return-value]
    (TensorSpec("y", "FP32", (-1, 2)),),
)


def make_served(accepts_pushes: bool = True) -> ServedModel:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return ServedModel(SPEC, module, lambda m, x: m(x), accepts_pushes, torch.device("cpu"))


def trained(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        k: v.detach().clone()
        for k, v in nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict().items()
    }


def parts(
    tensors: dict[str, torch.Tensor], digest: bytes, chunk: int = 16
) -> Iterator[bytes | Commit]:
    yield from Payload.of(list(tensors.items())).chunks(chunk)
    yield Commit(digest)


def push(
    plane: SyncPlane,
    state: dict[str, torch.Tensor],
    version: int,
    base: int = 0,
    send: dict[str, torch.Tensor] | None = None,
    digest: bytes | None = None,
) -> int:
    send = state if send is None else send
    header = PushHeader("m", version, base, "trainer-a", Payload.of(list(send.items())).nbytes)
    return plane.applier.apply(header, parts(send, digest or state_digest(state))).version


def served_state(model: ServedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.live.module.state_dict().items()}


def assert_state(model: ServedModel, state: dict[str, torch.Tensor]) -> None:
    live = model.live.module.state_dict()
    assert live.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(live[name], tensor), name
    assert model.live.digest == state_digest(state)


@pytest.fixture
def model() -> ServedModel:
    return make_served()


@pytest.fixture
def plane(model: ServedModel) -> SyncPlane:
    return SyncPlane({"m": model}, SyncLimits(max_payload_bytes=1 << 20, drain_timeout_s=0.5))


def test_full_push_commits_bit_exact_weights_and_version(
    model: ServedModel, plane: SyncPlane
) -> None:
    state = trained(1)
    assert push(plane, state, 1) == 1
    assert_state(model, state)
    assert model.live.writer_id == "trainer-a"


def test_deltas_carry_only_changed_tensors_and_stay_exact_across_many_syncs(
    model: ServedModel, plane: SyncPlane
) -> None:
    state = trained(1)
    push(plane, state, 1)
    g = torch.Generator().manual_seed(5)
    names = list(state)
    for version in range(2, 30):
        changed = names[version % len(names)]
        state[changed] = state[changed] + torch.randn(state[changed].shape, generator=g)
        if version % 7 == 0:
            push(plane, state, version)  # a full push now and then
        else:
            push(plane, state, version, base=version - 1, send={changed: state[changed]})
        assert_state(model, state)


def test_delta_on_a_base_not_served_is_refused_and_changes_nothing(
    model: ServedModel, plane: SyncPlane
) -> None:
    before = served_state(model)
    with pytest.raises(BaseVersionMismatchError, match="applies to version 3 but version 0"):
        push(plane, trained(1), 4, base=3)
    assert_state(model, before)


def test_stale_version_is_a_conflict(model: ServedModel, plane: SyncPlane) -> None:
    push(plane, trained(1), 5)
    state = served_state(model)
    with pytest.raises(ConflictError, match="version 5 is not newer than the served version 5"):
        push(plane, trained(2), 5)
    assert_state(model, state)


@pytest.mark.parametrize("cut", [0, 1, 9, 50])
def test_a_stream_that_ends_early_changes_nothing(
    model: ServedModel, plane: SyncPlane, cut: int
) -> None:
    push(plane, trained(1), 1)
    before = served_state(model)
    state = trained(2)
    payload = Payload.of(list(state.items()))
    truncated = list(payload.chunks(16))[:cut]
    header = PushHeader("m", 2, 0, "t", payload.nbytes)
    with pytest.raises(MalformedPushError):
        plane.applier.apply(header, iter(truncated))
    assert_state(model, before)
    assert push(plane, state, 2) == 2  # and the next push works
    assert_state(model, state)


def test_digest_mismatch_changes_nothing(model: ServedModel, plane: SyncPlane) -> None:
    before = served_state(model)
    with pytest.raises(MalformedPushError, match="digest mismatch"):
        push(plane, trained(1), 1, digest=b"\0" * 16)
    assert_state(model, before)
    state = trained(3)  # a half-written standby must not leak into a later delta
    push(plane, state, 2)
    state["0.bias"] = state["0.bias"] + 1
    push(plane, state, 3, base=2, send={"0.bias": state["0.bias"]})
    assert_state(model, state)


def test_full_push_must_carry_every_tensor(model: ServedModel, plane: SyncPlane) -> None:
    state = trained(1)
    with pytest.raises(MalformedPushError, match=r"missing: 2\.bias, 2\.weight"):
        push(plane, state, 1, send={"0.weight": state["0.weight"], "0.bias": state["0.bias"]})


def test_inference_only_model_refuses_pushes() -> None:
    plane = SyncPlane({"m": make_served(accepts_pushes=False)}, SyncLimits())
    with pytest.raises(InferenceOnlyModelError, match="inference-only"):
        push(plane, trained(1), 1)


def test_unknown_model_and_size_limit(plane: SyncPlane) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named 'x'"):
        plane.applier.apply(PushHeader("x", 1, 0, "t", 10), iter([]))
    with pytest.raises(ResourceLimitError, match="exceeds the 1048576-byte limit"):
        plane.applier.apply(PushHeader("m", 1, 0, "t", 2 << 20), iter([]))


def test_a_second_concurrent_push_is_a_conflict(model: ServedModel, plane: SyncPlane) -> None:
    state = trained(1)
    payload = Payload.of(list(state.items()))
    gate = threading.Event()
    entered = threading.Event()

    def slow() -> Iterator[bytes | Commit]:
        chunks = list(payload.chunks(16))
        yield chunks[0]
        entered.set()
        gate.wait(5)
        yield from chunks[1:]
        yield Commit(state_digest(state))

    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            plane.applier.apply(PushHeader("m", 1, 0, "slow", payload.nbytes), slow()).version
        )
    )
    thread.start()
    entered.wait(5)
    assert model.pending is not None and model.pending.writer_id == "slow"
    with pytest.raises(ConflictError, match=r"another push from 'slow' \(version 1\)"):
        push(plane, trained(2), 2)
    gate.set()
    thread.join()
    assert result == [1]
    assert_state(model, state)


def test_requests_in_flight_finish_on_their_version_and_pushes_wait_for_them(
    model: ServedModel, plane: SyncPlane
) -> None:
    push(plane, trained(1), 1)  # standby now holds version 0's module
    with model.acquire() as pinned:  # a request on version 1
        push(plane, trained(2), 2)  # writes the other copy: fine
        assert pinned.version == 1
        with pytest.raises(UnavailableError, match=r"did not finish within 0\.5s"):
            push(plane, trained(3), 3)  # would overwrite the pinned copy: waits, gives up
        assert_state(model, trained(2))
    assert push(plane, trained(3), 3) == 3


def test_the_last_writer_to_acquire_fences_the_ones_before(
    model: ServedModel, plane: SyncPlane
) -> None:
    def push_as(writer: str, epoch: int, version: int) -> int:
        state = trained(version)
        header = PushHeader("m", version, 0, writer, Payload.of(list(state.items())).nbytes, epoch)
        return plane.applier.apply(header, parts(state, state_digest(state))).version

    assert plane.acquire_writer("m", "a") == 1
    assert push_as("a", 1, 1) == 1
    assert plane.acquire_writer("m", "b") == 2
    before = served_state(model)
    with pytest.raises(
        FencedError,
        match=r"written by 'b' \(epoch 2\); this push from 'a' carries epoch 1 and is fenced",
    ):
        push_as("a", 1, 2)
    assert_state(model, before)
    with pytest.raises(FencedError):
        push_as("anonymous", 0, 2)  # pushes without a lease are fenced once anyone holds one
    assert push_as("b", 2, 2) == 2
    before = served_state(model)
    with pytest.raises(UnknownEpochError, match="carries epoch 5, newer than the newest granted"):
        push_as("c", 5, 3)  # an epoch not granted here (a lease lost in a restart): refused
    assert_state(model, before)
    assert model.lease.snapshot() == (2, "b")  # a push never moves the lease


def test_pushes_without_a_lease_commit_until_the_first_grant(
    model: ServedModel, plane: SyncPlane
) -> None:
    assert push(plane, trained(1), 1) == 1  # epoch 0: nobody has acquired the model
    assert push(plane, trained(2), 2) == 2
    plane.acquire_writer("m", "a")
    with pytest.raises(FencedError, match="carries epoch 0 and is fenced"):
        push(plane, trained(3), 3)
    assert_state(model, trained(2))


def test_a_push_whose_writer_is_fenced_before_its_commit_swaps_nothing(
    model: ServedModel, plane: SyncPlane
) -> None:
    epoch = plane.acquire_writer("m", "a")
    state = trained(1)
    payload = Payload.of(list(state.items()))

    def fenced_before_the_commit() -> Iterator[bytes | Commit]:
        yield from payload.chunks(16)
        plane.acquire_writer("m", "b")  # lands after every byte is staged, before the swap
        yield Commit(state_digest(state))

    before = served_state(model)
    header = PushHeader("m", 1, 0, "a", payload.nbytes, epoch)
    with pytest.raises(FencedError, match=r"written by 'b' \(epoch 2\); this push from 'a'"):
        plane.applier.apply(header, fenced_before_the_commit())
    assert_state(model, before)
    assert model.live.version == 0 and model.pending is None


def test_rollback_refuses_a_version_out_of_range(plane: SyncPlane) -> None:
    with pytest.raises(OutOfRangeError, match=r"to_version 9223372036854775808 is out of range"):
        plane.rollback("m", 1 << 63)


def test_inference_only_models_have_no_writer() -> None:
    plane = SyncPlane({"m": make_served(accepts_pushes=False)}, SyncLimits())
    with pytest.raises(InferenceOnlyModelError, match="has no writer"):
        plane.acquire_writer("m", "a")
