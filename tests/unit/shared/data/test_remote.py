"""RemoteDataCollector against a real experience plane served in this process: samples arrive in
order, batches split to the trainer's limit, refusals and an absent trainer are reported as
dropped samples, and `collect` never waits for any of it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from shared.app import App, TensorSpec
from shared.data import DictSequentialBuffer
from shared.data.remote import RemoteDataCollector
from shared.data.remote.call import TOO_LARGE, refused
from shared.gen.experience.v1 import experience_pb2 as pb
from shared.gen.experience.v1 import experience_pb2_grpc as experience_grpc
from shared.grpc.errors import error_reason
from trainer_service.experience.buffers import Buffers
from trainer_service.experience.server import ExperienceEndpoint, ExperienceServer
from trainer_service.experience.service import ExperiencePlane

TENSORS = [TensorSpec("x", "FP32", (2,)), TensorSpec("id", "INT64", ())]


class Trainer:
    """The experience plane of a trainer holding the buffer 'steps', on a free port."""

    def __init__(self, max_batch_bytes: int = 1 << 20, port: int = 0) -> None:
        app = App()
        app.add_buffer("steps", lambda: DictSequentialBuffer(["x", "id"], 10_000), tensors=TENSORS)
        self.buffers = Buffers.of(app)
        plane = ExperiencePlane(self.buffers.users, self.buffers.schemas, max_batch_bytes)
        self.server = ExperienceServer(
            plane, ExperienceEndpoint(f"127.0.0.1:{port}", None, None, 4)
        )
        self.address = f"127.0.0.1:{self.server.start()}"

    def ids(self) -> list[int]:
        return [int(t) for t in self.buffers.users["steps"].get_data()["id"]]


@pytest.fixture
def trainer() -> Iterator[Trainer]:
    running = Trainer()
    yield running
    running.server.stop(0)


def sample(i: int) -> dict[str, object]:
    return {"x": torch.full((2,), float(i)), "id": torch.tensor(i)}


def test_samples_arrive_in_order_and_are_acknowledged(trainer: Trainer) -> None:
    with RemoteDataCollector(trainer.address, "steps", batch_size=16) as collector:
        for i in range(300):
            collector.collect(sample(i))
        assert collector.flush(timeout=30)
        stats = collector.stats
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (300, 300, 0, 0)
    assert trainer.ids() == list(range(300))


def test_numpy_arrays_and_numbers_keep_their_types(trainer: Trainer) -> None:
    with RemoteDataCollector(trainer.address, "steps") as collector:
        collector.collect({"x": np.array([1.5, 2.5], dtype=np.float32), "id": 7})
        assert collector.flush(timeout=30)
    data = trainer.buffers.users["steps"].get_data()
    assert data["x"][0].tolist() == [1.5, 2.5] and data["id"][0].item() == 7


def test_a_reversed_numpy_view_is_copied_and_an_array_torch_cannot_take_is_named(
    trainer: Trainer,
) -> None:
    with RemoteDataCollector(trainer.address, "steps") as collector:
        collector.collect({"x": np.arange(2, dtype=np.float32)[::-1], "id": 1})  # stride < 0
        with pytest.raises(ValueError, match=r"tensor 'x': a numpy array of dtype object cannot"):
            collector.collect({"x": np.array([None, 1.0], dtype=object), "id": 2})
        assert collector.flush(timeout=30)
    data = trainer.buffers.users["steps"].get_data()
    assert [x.tolist() for x in data["x"]] == [[1.0, 0.0]]


def test_the_sample_is_copied_at_collect(trainer: Trainer) -> None:
    x = torch.zeros(2)
    with RemoteDataCollector(trainer.address, "steps") as collector:
        collector.collect({"x": x, "id": torch.tensor(0)})
        x.fill_(9.0)  # the agent reuses its memory at once
        assert collector.flush(timeout=30)
    assert trainer.buffers.users["steps"].get_data()["x"][0].tolist() == [0.0, 0.0]


def test_batches_are_split_to_the_trainers_limit() -> None:
    small = Trainer(max_batch_bytes=400)  # a batch of 8 of these samples takes ~330 bytes
    try:
        with RemoteDataCollector(small.address, "steps", batch_size=64) as collector:
            for i in range(100):
                collector.collect(sample(i))
            assert collector.flush(timeout=30)
            assert collector.stats.dropped == 0
        assert small.ids() == list(range(100))
    finally:
        small.server.stop(0)


def test_a_sample_larger_than_any_batch_is_dropped_and_said_why() -> None:
    tiny = Trainer(max_batch_bytes=100)
    try:
        collector = RemoteDataCollector(tiny.address, "steps")
        collector.collect(sample(1))
        assert collector.flush(timeout=30)
        stats = collector.close()
        assert (stats.acknowledged, stats.dropped) == (0, 1)
        assert stats.last_error is not None
        assert re.search(
            r"a sample takes \d+ bytes; the trainer takes batches of at most 100", stats.last_error
        )
    finally:
        tiny.server.stop(0)


def test_a_batch_the_trainer_refuses_is_dropped_with_its_reason(trainer: Trainer) -> None:
    collector = RemoteDataCollector(trainer.address, "steps")
    for i in range(3):
        collector.collect({"x": np.zeros(2), "id": i})  # float64: the buffer collects FP32
    assert collector.flush(timeout=30)
    stats = collector.close()
    assert (stats.acknowledged, stats.dropped) == (0, 3)
    assert stats.last_error is not None
    assert "INVALID_ARGUMENT" in stats.last_error
    assert "tensor 'x' has dtype 'F64' but the buffer collects FP32 (F32)" in stats.last_error
    assert trainer.ids() == []


def test_an_unknown_buffer_is_reported_and_nothing_is_sent(trainer: Trainer) -> None:
    collector = RemoteDataCollector(trainer.address, "nowhere", max_pending=2)
    for i in range(5):
        collector.collect(sample(i))
    assert not collector.flush(timeout=0.5)
    stats = collector.close(timeout=0)
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (5, 0, 5, 0)
    assert stats.last_error is not None
    assert "dropped" in stats.last_error


def test_while_the_trainer_is_away_the_oldest_samples_go_and_are_counted() -> None:
    gone = Trainer()
    gone.server.stop(0)  # its port now refuses connections
    collector = RemoteDataCollector(gone.address, "steps", max_pending=10, timeout_s=1)
    for i in range(25):
        collector.collect(sample(i))  # never waits for the trainer
    stats = collector.stats
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (25, 0, 15, 10)
    assert stats.last_error is not None
    assert stats.last_error.startswith(
        "dropped 1 sample(s): the queue of samples waiting for the trainer is full"
    )
    assert not collector.flush(timeout=0.3)
    final = collector.close(timeout=0)
    assert (final.dropped, final.pending) == (25, 0)


def test_the_samples_waiting_are_bounded_by_bytes_too_and_the_newest_are_sent() -> None:
    # A sample is 2 float32 and one int64: 16 bytes; 100 bytes hold 6 of them.
    held = Trainer()
    port = held.address
    held.server.stop(0)  # away while the agent collects
    collector = RemoteDataCollector(
        port, "steps", max_pending=1000, max_pending_bytes=100, timeout_s=1, retry_max_s=0.2
    )
    for i in range(20):
        collector.collect(sample(i))  # never waits for the trainer
    stats = collector.stats
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (20, 0, 14, 6)
    assert stats.last_error is not None
    assert stats.last_error.startswith(
        "dropped 1 sample(s): the queue of samples waiting for the trainer is full: 6 samples "
        "of 16 bytes (max_pending 1000, max_pending_bytes 100)"
    )
    back = Trainer(port=int(port.rsplit(":", 1)[1]))  # the trainer returns on the same port
    try:
        assert collector.flush(timeout=30)
        final = collector.close()
        assert (final.acknowledged, final.dropped, final.pending) == (6, 14, 0)
        assert back.ids() == list(range(14, 20))
    finally:
        back.server.stop(0)


def test_a_sample_larger_than_max_pending_bytes_is_dropped_when_collected(
    trainer: Trainer,
) -> None:
    collector = RemoteDataCollector(trainer.address, "steps", max_pending_bytes=15)
    for i in range(3):
        collector.collect(sample(i))
    with pytest.raises(ValueError, match="differs from the first one collected"):
        collector.collect({"x": torch.zeros(3), "id": torch.tensor(1)})
    stats = collector.close()
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (3, 0, 3, 0)
    assert stats.last_error == (
        "dropped 1 sample(s): a sample takes 16 bytes; the collector holds at most "
        "max_pending_bytes 15 of samples waiting"
    )
    assert trainer.ids() == []
    with pytest.raises(ValueError, match="max_pending_bytes"):
        RemoteDataCollector(trainer.address, "steps", max_pending_bytes=0)


def test_collect_refuses_a_sample_unlike_the_first_and_after_close(trainer: Trainer) -> None:
    collector = RemoteDataCollector(trainer.address, "steps")
    collector.collect(sample(0))
    with pytest.raises(ValueError, match="differs from the first one collected"):
        collector.collect({"x": torch.zeros(3), "id": torch.tensor(1)})
    with pytest.raises(ValueError, match="differs from the first one collected"):
        collector.collect({"x": torch.zeros(2)})
    collector.close()
    with pytest.raises(RuntimeError, match="this RemoteDataCollector is closed"):
        collector.collect(sample(1))
    assert trainer.ids() == [0]


def test_collect_names_a_value_that_is_no_tensor_and_a_sample_that_is_no_mapping(
    trainer: Trainer,
) -> None:
    """A careless agent's sample: a string where a tensor goes, None where the sample goes. Each
    is refused with a message naming what is wrong, first sample or later, and nothing is sent."""
    collector = RemoteDataCollector(trainer.address, "steps")
    with pytest.raises(ValueError, match="tensor 'x': a value of type str is not a tensor"):
        collector.collect({"x": "str", "id": 1})
    with pytest.raises(TypeError, match=r"a sample maps each tensor's name .* not a NoneType"):
        collector.collect(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a list"):
        collector.collect_rows([1, 2])  # type: ignore[arg-type]
    collector.collect(sample(0))
    with pytest.raises(ValueError, match="tensor 'id': a value of type str is not a tensor"):
        collector.collect({"x": torch.zeros(2), "id": "one"})
    with pytest.raises(TypeError, match=r"a sample maps each tensor's name .* not a NoneType"):
        collector.collect(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tensor 'x': a value of type object is not a tensor"):
        collector.collect_rows({"x": object(), "id": torch.zeros(1)})
    collector.close()
    assert trainer.ids() == [0]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            {"x": torch.zeros(2, dtype=torch.float64), "id": torch.tensor(1)},
            "tensor 'x' is torch.float64",
        ),
        ({"x": torch.zeros(2), "id": torch.tensor(1.0)}, "tensor 'id' is torch.float32"),
        ({"x": torch.zeros(1, 2), "id": torch.tensor(1)}, r"tensor 'x' is torch.float32 \[1, 2\]"),
        ({"x": torch.zeros(2)}, r"sample names \['x'\] differ"),
        ({"x": torch.zeros(2), "ids": torch.tensor(1)}, r"sample names \['ids', 'x'\] differ"),
        (
            {"x": torch.zeros(2), "id": torch.tensor(1), "more": torch.tensor(1)},
            r"sample names \['id', 'more', 'x'\] differ",
        ),
    ],
)
def test_collect_refuses_a_sample_unlike_the_first_after_many_good_ones(
    trainer: Trainer, data: dict[str, object], why: str
) -> None:
    with RemoteDataCollector(trainer.address, "steps", batch_size=4) as collector:
        for i in range(10):  # full batches and one begun: the layout's fast path in use
            collector.collect(sample(i))
        with pytest.raises(ValueError, match=f"differs from the first one collected, .*{why}"):
            collector.collect(data)
        collector.collect(sample(10))
        assert collector.flush(timeout=30)
        stats = collector.stats
    assert (stats.collected, stats.acknowledged, stats.dropped) == (11, 11, 0)
    assert trainer.ids() == list(range(11))  # the refused sample took no row


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"batch_size": 2.5}, "batch_size must be a whole number, at least 1: got 2.5"),
        ({"max_in_flight": True}, "max_in_flight must be a whole number, at least 1: got True"),
        ({"max_pending": 0}, "max_pending must be a whole number, at least 1: got 0"),
        ({"max_delay_s": float("nan")}, "max_delay_s must be a finite number of seconds"),
        ({"timeout_s": 0}, "timeout_s must be a finite number of seconds, above 0"),
        ({"buffer": None}, "buffer must be a buffer's name .*: got None"),
        ({"buffer": b"steps"}, "buffer must be a buffer's name .*: got b'steps'"),
        ({"buffer": ""}, "buffer must be a buffer's name"),
    ],
)
def test_settings_no_call_could_use_are_refused_when_the_collector_is_made(
    settings: dict[str, Any], why: str
) -> None:
    arguments: dict[str, Any] = {"address": "127.0.0.1:9", "buffer": "steps", **settings}
    with pytest.raises(ValueError, match=why):
        RemoteDataCollector(**arguments)


# A batch more than 64 KiB over the trainer's --experience-max-batch is refused by gRPC itself,
# with no error reason: the answer a busy plane gives ("retry later"). The collector takes it
# as the refusal it is (found by an outside review, which resent such a batch).
def test_a_message_over_the_transport_limit_is_a_refusal_not_a_busy_plane() -> None:
    small = Trainer(max_batch_bytes=1 << 20)
    try:
        with grpc.insecure_channel(small.address) as channel:
            collect = experience_grpc.ExperienceStub(channel).Collect
            batch = pb.Batch(buffer="steps", sequence=1, payload=bytes(2 << 20))
            with pytest.raises(grpc.RpcError) as caught:
                list(collect(iter([batch]), timeout=30))
    finally:
        small.server.stop(0)
    error = caught.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error) is None and TOO_LARGE in (error.details() or "")
    assert refused(error)
