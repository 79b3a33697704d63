"""The prefetcher hands over a stream unchanged, errors in place, and never runs far ahead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from shared.grpc import prefetch
from shared.grpc.prefetch import Prefetcher


def test_items_arrive_in_order_and_the_stream_ends() -> None:
    with Prefetcher(iter(range(1000)), depth=3) as items:
        assert list(items) == list(range(1000))
        with pytest.raises(StopIteration):
            next(items)


def test_an_error_of_the_source_is_raised_in_its_place() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ConnectionError("cut off")

    with Prefetcher(source()) as items:
        assert next(items) == 1
        assert next(items) == 2
        with pytest.raises(ConnectionError, match="cut off"):
            next(items)
        with pytest.raises(StopIteration):
            next(items)


def test_waiting_says_none_while_the_source_stalls_and_passes_on_its_end_and_errors() -> None:
    go_on = threading.Event()

    def source() -> Iterator[int]:
        yield 1
        go_on.wait(10)
        yield 2
        raise ConnectionError("cut off")

    with Prefetcher(source()) as items:
        seen = items.waiting(0.01)
        assert next(seen) == 1
        assert next(seen) is None  # the source stalls
        assert next(seen) is None
        go_on.set()
        rest = []
        with pytest.raises(ConnectionError, match="cut off"):
            for item in seen:
                rest.append(item)
        assert [item for item in rest if item is not None] == [2]
    with Prefetcher(iter([1, 2])) as items:
        assert [i for i in items.waiting(1.0) if i is not None] == [1, 2]


def test_it_reads_at_most_depth_items_ahead_and_stops_once_closed() -> None:
    pulled: list[int] = []
    finished = threading.Event()

    def source() -> Iterator[int]:
        try:
            for i in range(100):
                pulled.append(i)
                yield i
        finally:
            finished.set()

    items = Prefetcher(source(), depth=2)
    assert next(items) == 0
    time.sleep(0.3)
    # one handed over, two queued, one pulled and waiting for room
    assert len(pulled) == 4
    items.close()
    assert finished.wait(timeout=5), "the thread did not let go of the source"
    assert len(pulled) <= 5


@pytest.mark.parametrize("threaded", [True, False])
def test_the_process_setting_forces_the_choice(threaded: bool) -> None:
    """main() passes WEIGHTSYNC_PREFETCH (1 or 0) to read_ahead."""
    prefetch.read_ahead(threaded)
    try:
        with prefetch.prefetched(iter([1, 2]), "test") as items:
            assert isinstance(items, prefetch.Prefetcher) is threaded
            assert list(items) == [1, 2]
    finally:
        prefetch.read_ahead(None)
