"""The experience plane's use-case: a batch is checked whole, then stored through the buffer's
collector (so the buffer's own policy decides what a full one keeps); a resend is stored once."""

from __future__ import annotations

import re

import pytest
import torch

from shared.app import App, TensorSpec
from shared.data import DictRandomReplacementBuffer, DictSequentialBuffer, SequentialBuffer
from shared.data.batch import encode_batch
from shared.errors import (
    BufferNotFoundError,
    ConfigurationError,
    MalformedBatchError,
    ResourceLimitError,
)
from shared.trainer import Trainer, TrainersDict
from trainer_service.experience.buffers import Buffers
from trainer_service.experience.service import MAX_COLLECTORS, ExperiencePlane

TENSORS = [TensorSpec("x", "FP32", (2,)), TensorSpec("id", "INT64", ())]


def app(max_size: int = 100) -> App:
    built = App()
    built.add_buffer("steps", lambda: DictSequentialBuffer(["x", "id"], max_size), tensors=TENSORS)
    return built


def batch(first: int, count: int) -> bytes:
    return encode_batch(
        [
            {"x": torch.full((2,), float(i)), "id": torch.tensor(i)}
            for i in range(first, first + count)
        ]
    )


def plane(max_size: int = 100, max_batch_bytes: int = 1 << 20) -> tuple[ExperiencePlane, Buffers]:
    buffers = Buffers.of(app(max_size))
    return ExperiencePlane(buffers.users, buffers.schemas, max_batch_bytes), buffers


def ids(buffers: Buffers) -> list[int]:
    return [int(t) for t in buffers.users["steps"].get_data()["id"]]


def test_a_batch_is_stored_through_the_collector_in_order() -> None:
    experience, buffers = plane()
    payload = batch(0, 5)
    stored = experience.store("steps", 1, payload, "agent")
    assert (stored.samples, stored.payload_bytes, stored.duplicate) == (5, len(payload), False)
    assert len(buffers.users["steps"]) == 0  # queued for the trainer's next update
    assert ids(buffers) == [0, 1, 2, 3, 4]
    info = experience.buffers()[0]
    assert (info.name, info.size, info.received, info.max_queue_size) == ("steps", 5, 5, 100)
    assert [c.name for c in info.columns] == ["x", "id"]


def test_a_full_buffer_keeps_what_its_policy_keeps() -> None:
    experience, buffers = plane(max_size=4)
    experience.store("steps", 1, batch(0, 3))
    experience.store("steps", 2, batch(3, 3))  # the trainer did not look: the queue drops
    assert ids(buffers) == [2, 3, 4, 5]
    assert experience.buffers()[0].received == 6


def test_a_resent_batch_is_acknowledged_and_stored_once() -> None:
    experience, buffers = plane()
    experience.store("steps", 1, batch(0, 2), "agent")
    experience.store("steps", 2, batch(2, 2), "agent")
    again = experience.store("steps", 2, batch(2, 2), "agent")
    assert (again.samples, again.duplicate) == (0, True)
    experience.store("steps", 1, batch(0, 2), "other")  # another sender's numbers are its own
    experience.store("steps", 1, batch(9, 1))  # no id: always stored
    experience.store("steps", 1, batch(9, 1))
    assert ids(buffers) == [0, 1, 2, 3, 0, 1, 9, 9]
    assert experience.buffers()[0].received == 8


def test_senders_beyond_the_bound_are_forgotten_oldest_first() -> None:
    experience, _ = plane(max_size=10_000)
    for sender in range(MAX_COLLECTORS + 1):
        experience.store("steps", 1, batch(0, 1), f"agent-{sender}")
    assert experience.store("steps", 1, batch(0, 1), f"agent-{MAX_COLLECTORS}").duplicate
    assert not experience.store("steps", 1, batch(0, 1), "agent-0").duplicate  # forgotten


def test_bad_batches_store_nothing() -> None:
    experience, buffers = plane(max_batch_bytes=200)
    with pytest.raises(
        BufferNotFoundError,
        match=re.escape("batch 3: this trainer holds no buffer named 'other'; it holds: steps"),
    ):
        experience.store("other", 3, batch(0, 1))
    with pytest.raises(
        ResourceLimitError,
        match=re.escape(
            f"batch 4 for buffer 'steps' carries {len(batch(0, 20))} bytes; this trainer takes "
            "batches of at most 200 (--experience-max-batch)"
        ),
    ):
        experience.store("steps", 4, batch(0, 20))
    wrong = encode_batch([{"x": torch.zeros(3), "id": torch.tensor(1)}])
    with pytest.raises(MalformedBatchError, match="tensor 'x' has shape"):
        experience.store("steps", 5, wrong, "agent")
    assert ids(buffers) == []
    assert experience.buffers()[0].received == 0
    assert not experience.store("steps", 5, batch(0, 1), "agent").duplicate  # it never counted


def test_an_unbounded_buffer_is_refused() -> None:
    unbounded = App()

    class Unbounded(SequentialBuffer[object]):
        def __init__(self) -> None:
            super().__init__(10)
            self._max_queue_size = None

    unbounded.add_buffer("open", Unbounded, tensors=TENSORS)
    with pytest.raises(ConfigurationError, match="buffer 'open' has no max_queue_size"):
        Buffers.of(unbounded)


class Waits(Trainer):
    def __init__(self) -> None:
        super().__init__("nowhere", min_buffer_size=1)

    def train(self) -> None:
        pass


def test_a_trainer_waiting_on_an_undeclared_buffer_is_refused() -> None:
    with pytest.raises(
        ConfigurationError,
        match=re.escape(
            "trainer 'waits' trains when buffer 'nowhere' has data, but the app declares no "
            "such buffer (it declares: steps)"
        ),
    ):
        Buffers.of(app()).attach(TrainersDict({"waits": Waits()}))


def test_a_random_replacement_buffer_keeps_each_sample_in_memory_of_its_own() -> None:
    built = App()
    built.add_buffer("steps", lambda: DictSequentialBuffer(["x", "id"], 100), tensors=TENSORS)
    built.add_buffer(
        "random", lambda: DictRandomReplacementBuffer(["x", "id"], 100), tensors=TENSORS
    )
    buffers = Buffers.of(built)
    experience = ExperiencePlane(buffers.users, buffers.schemas, 1 << 20)
    payload = bytearray(batch(0, 3))
    experience.store("steps", 1, payload)
    experience.store("random", 1, payload)
    payload[-1] ^= 0xFF  # the message's memory is not the samples'
    for name in ("steps", "random"):
        kept = buffers.users[name].get_data()["x"]
        assert [t.tolist() for t in kept] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    # Keeping one sample never keeps its whole batch alive in a buffer that may keep any.
    kept = buffers.users["random"].get_data()["x"]
    assert len({t.untyped_storage().data_ptr() for t in kept}) == 3
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in kept)
    # A sequential buffer keeps the batch as one block (one copy per tensor) and indexes into
    # it: it drops samples oldest first, so the block goes with its last sample.
    steps = buffers.users["steps"].get_data()["x"]
    assert len({t.untyped_storage().data_ptr() for t in steps}) == 1
    assert steps[0].untyped_storage().nbytes() == 3 * steps[0].nbytes
