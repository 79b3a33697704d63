"""RemoteDataCollector.collect_rows against a real experience plane served in this process:
many samples in one call arrive bit-exact and in order, every sample `collect` refuses is
refused in rows too (nothing of the call collected), the bounds drop exactly the samples,
counted alike, that `collect` called row by row drops, and a call allowed to wait for a trainer
that takes samples loses none of more rows than the queue holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from shared.data.remote import RemoteDataCollector
from tests.unit.shared.data.test_remote import Trainer, sample
from trainer_service.experience.service import ExperiencePlane


@pytest.fixture
def trainer() -> Iterator[Trainer]:
    running = Trainer()
    yield running
    running.server.stop(0)


def rows(first: int, count: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(first, first + count)
    x = torch.stack([ids.float() * 0.1, -ids.float() / 3])
    return {"x": x.T, "id": ids}  # x is a transposed view: not contiguous


def test_rows_arrive_bit_exact_and_in_order_among_single_samples(trainer: Trainer) -> None:
    expected = [rows(0, 5), rows(5, 300), rows(305, 1), rows(306, 40)]
    with RemoteDataCollector(trainer.address, "steps", batch_size=16) as collector:
        collector.collect_rows(expected[0])
        collector.collect_rows(
            {"x": expected[1]["x"].contiguous(), "id": expected[1]["id"].numpy()}
        )
        collector.collect(sample(999))
        collector.collect_rows(expected[2])
        collector.collect_rows({"x": expected[3]["x"].numpy(), "id": expected[3]["id"]})
        collector.collect_rows({"x": torch.zeros(0, 2), "id": torch.zeros(0, dtype=torch.int64)})
        assert collector.flush(timeout=30)
        stats = collector.stats
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (347, 347, 0, 0)
    data = trainer.buffers.users["steps"].get_data()
    ids = [*range(305), 999, *range(305, 346)]
    assert [int(i) for i in data["id"]] == ids
    x = torch.cat([expected[0]["x"], expected[1]["x"], torch.full((1, 2), 999.0), *[
        e["x"] for e in expected[2:]
    ]])  # fmt: skip
    assert torch.equal(torch.stack(list(data["x"])), x)


def test_the_first_rows_set_the_layout_and_later_samples_keep_it(trainer: Trainer) -> None:
    with RemoteDataCollector(trainer.address, "steps") as collector:
        collector.collect_rows(rows(0, 3))
        with pytest.raises(ValueError, match="differs from the first one collected"):
            collector.collect({"x": torch.zeros(3), "id": torch.tensor(1)})
        collector.collect(sample(3))
        assert collector.flush(timeout=30)
    assert trainer.ids() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            {"x": torch.zeros(4, 2, dtype=torch.float64), "id": torch.arange(4)},
            r"tensor 'x' is torch.float64 \[2\] a row, not torch.float32 \[2\]",
        ),
        (
            {"x": torch.zeros(4, 2), "id": torch.zeros(4)},
            r"tensor 'id' is torch.float32 \[\] a row, not torch.int64 \[\]",
        ),
        ({"x": torch.zeros(4, 3), "id": torch.arange(4)}, r"tensor 'x' is torch.float32 \[3\]"),
        (
            {"x": torch.zeros(4, 1, 2), "id": torch.arange(4)},
            r"tensor 'x' is torch.float32 \[1, 2\]",
        ),
        ({"x": torch.zeros(4, 2)}, r"sample names \['x'\] differ"),
        ({"x": torch.zeros(4, 2), "ids": torch.arange(4)}, r"sample names \['ids', 'x'\] differ"),
        (
            {"x": torch.zeros(4, 2), "id": torch.arange(4), "more": torch.arange(4)},
            r"sample names \['id', 'more', 'x'\] differ",
        ),
        (
            {"x": torch.zeros(2, 2).to_sparse(), "id": torch.arange(2)},
            "tensor 'x' cannot be copied: layout torch.sparse_coo",
        ),
    ],
)
def test_rows_unlike_the_first_sample_are_refused_and_nothing_is_collected(
    trainer: Trainer, data: dict[str, object], why: str
) -> None:
    with RemoteDataCollector(trainer.address, "steps", batch_size=4) as collector:
        collector.collect_rows(rows(0, 10))  # full batches and one begun
        with pytest.raises(ValueError, match=f"differs from the first one collected, .*{why}"):
            collector.collect_rows(data)
        collector.collect(sample(10))
        assert collector.flush(timeout=30)
        stats = collector.stats
    assert (stats.collected, stats.acknowledged, stats.dropped) == (11, 11, 0)
    assert trainer.ids() == list(range(11))


@pytest.mark.parametrize(
    "data",
    [
        {"x": torch.zeros(4, 2), "id": torch.arange(3)},
        {"x": torch.zeros(2), "id": torch.tensor(1)},
    ],
)
def test_rows_of_unequal_or_missing_counts_are_refused(
    trainer: Trainer, data: dict[str, object]
) -> None:
    collector = RemoteDataCollector(trainer.address, "steps")
    with pytest.raises(ValueError, match="must hold the same number of samples along its first"):
        collector.collect_rows(data)
    stats = collector.close()
    assert (stats.collected, stats.dropped) == (0, 0)
    with pytest.raises(RuntimeError, match="this RemoteDataCollector is closed"):
        collector.collect_rows(rows(0, 2))


@pytest.mark.parametrize(
    ("max_pending", "max_pending_bytes", "before", "count"),
    [
        (10, 1 << 20, 0, 25),  # more rows than the queue holds: the newest 10 stay
        (10, 1 << 20, 7, 6),  # the rows fit, the oldest samples already waiting go
        (10, 1 << 20, 4, 6),  # all fit
        (1000, 100, 3, 20),  # bounded by bytes: 6 samples of 16 bytes
        (1000, 15, 2, 5),  # a sample larger than max_pending_bytes: every one dropped
        (64, 1 << 20, 50, 200),  # several slabs of rows, more than the queue
    ],
)
def test_rows_drop_what_collect_row_by_row_drops(
    max_pending: int, max_pending_bytes: int, before: int, count: int
) -> None:
    away = [Trainer(), Trainer()]
    for t in away:
        t.server.stop(0)  # its port now refuses connections: nothing is sent
    collectors = [
        RemoteDataCollector(
            t.address,
            "steps",
            batch_size=8,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
            timeout_s=1,
            retry_max_s=0.2,
        )
        for t in away
    ]
    by_row, in_rows = collectors
    for c in collectors:
        for i in range(before):
            c.collect(sample(i))
    for i in range(before, before + count):
        by_row.collect(sample(i))
    in_rows.collect_rows(rows(before, count))
    counts = [
        (s.collected, s.acknowledged, s.dropped, s.pending) for s in (by_row.stats, in_rows.stats)
    ]
    assert counts[1] == counts[0]
    assert counts[1][0] == before + count
    back = [Trainer(port=int(t.address.rsplit(":", 1)[1])) for t in away]
    try:
        finals = [c.close(timeout=30) for c in collectors]
        assert [(f.collected, f.acknowledged, f.dropped) for f in finals] == [
            (finals[0].collected, finals[0].acknowledged, finals[0].dropped)
        ] * 2
        assert back[1].ids() == back[0].ids()
        kept = min(before + count, max_pending, max_pending_bytes // 16)
        assert back[1].ids() == list(range(before + count - kept, before + count))
        x = [back[1].buffers.users["steps"].get_data()["x"][k] for k in range(kept)]
        expected = [
            torch.full((2,), float(i)) if i < before else rows(i, 1)["x"][0] for i in back[1].ids()
        ]
        assert all(torch.equal(a, b) for a, b in zip(x, expected, strict=True))
    finally:
        for t in back:
            t.server.stop(0)


def test_numpy_rows_keep_their_dtype(trainer: Trainer) -> None:
    with RemoteDataCollector(trainer.address, "steps") as collector:
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        collector.collect_rows({"x": x, "id": np.arange(3)})
        assert collector.flush(timeout=30)
    data = trainer.buffers.users["steps"].get_data()
    assert torch.equal(torch.stack(list(data["x"])), torch.from_numpy(x))


# A first sample refused (a tensor that cannot be copied) still set the layout every later
# sample was held to, so correct samples were refused after it (found by an outside review).
def test_a_first_sample_refused_sets_no_layout(trainer: Trainer) -> None:
    with RemoteDataCollector(trainer.address, "steps") as collector:
        meta = {"x": torch.empty(2, 2, device="meta"), "id": torch.tensor(0)}
        with pytest.raises(ValueError, match=r"^sample refused: tensor 'x' cannot be copied"):
            collector.collect(meta)
        with pytest.raises(ValueError, match=r"^sample refused: "):
            collector.collect_rows({"x": torch.empty(3, 2, device="meta"), "id": torch.zeros(3)})
        collector.collect(sample(1))
        collector.collect_rows(rows(2, 2))
        assert collector.flush(timeout=30)
        assert collector.stats.acknowledged == 3
    assert trainer.ids() == [1, 2, 3]


def test_reversed_numpy_rows_are_copied(trainer: Trainer) -> None:
    with RemoteDataCollector(trainer.address, "steps") as collector:
        x = np.arange(6, dtype=np.float32).reshape(3, 2)[::-1, ::-1]  # negative strides
        collector.collect_rows({"x": x, "id": np.arange(3)})
        assert collector.flush(timeout=30)
    data = trainer.buffers.users["steps"].get_data()
    assert torch.equal(torch.stack(list(data["x"])), torch.from_numpy(x.copy()))


def test_rows_beyond_the_queue_wait_for_a_trainer_that_takes_them(trainer: Trainer) -> None:
    count = 3_000  # thirty times the queue
    with RemoteDataCollector(trainer.address, "steps", batch_size=16, max_pending=100) as c:
        c.collect_rows(rows(0, count), wait_s=60)
        assert c.flush(timeout=30)
        stats = c.stats
    assert (stats.collected, stats.acknowledged, stats.dropped, stats.pending) == (
        count,
        count,
        0,
        0,
    )
    data = trainer.buffers.users["steps"].get_data()
    assert trainer.ids() == list(range(count))
    assert torch.equal(torch.stack(list(data["x"])), rows(0, count)["x"])


def test_rows_do_not_wait_for_a_trainer_that_is_away() -> None:
    gone = Trainer()
    gone.server.stop(0)  # its port now refuses connections
    collector = RemoteDataCollector(gone.address, "steps", max_pending=10, timeout_s=1)
    collector.collect_rows(rows(0, 25), wait_s=600)  # returns once the trainer is found away
    stats = collector.close(timeout=0)
    assert (stats.collected, stats.acknowledged, stats.dropped) == (25, 0, 25)
    assert stats.last_error is not None
    assert f"the trainer at {gone.address}: UNAVAILABLE" in stats.last_error


# A trainer that stops acknowledging (its process stopped, say) held collect_rows(wait_s=2)
# until the collector's timeout_s (30 s): each slab of the rows waited wait_s anew (found by an
# outside review). Once a wait ends with nothing acknowledged, the rest of the call waits no
# more.
def test_rows_wait_at_most_wait_s_for_a_trainer_that_stops_acknowledging(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RemoteDataCollector(
        trainer.address, "steps", batch_size=16, max_pending=1_000, timeout_s=120
    ) as collector:
        collector.collect_rows(rows(0, 16))
        assert collector.flush(timeout=30)
        hung = threading.Event()
        monkeypatch.setattr(ExperiencePlane, "store_block", lambda *_, **__: hung.wait())
        try:
            collector.collect_rows(rows(16, 1_000))  # fills the queue
            started = time.monotonic()
            collector.collect_rows(rows(1_016, 1_000), wait_s=1)  # 63 slabs of 16
            took = time.monotonic() - started
            stats = collector.stats
        finally:
            hung.set()
        assert took < 10, took  # each slab waited its second: 63 s
        assert (stats.collected, stats.acknowledged) == (2_016, 16)
        assert stats.dropped == 2_016 - 16 - stats.pending
