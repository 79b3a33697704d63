"""The daemon threads that run model calls of models not batched."""

from __future__ import annotations

import threading

import pytest

from inference_service.dataplane.model_threads import ModelThreads
from shared.errors import UnavailableError


def test_calls_run_and_their_errors_reach_the_caller() -> None:
    threads = ModelThreads(2, "model")
    assert threads.submit(lambda a, b: a + b, 2, 3).result(timeout=10) == 5
    with pytest.raises(ZeroDivisionError):
        threads.submit(lambda: 1 / 0).result(timeout=10)
    assert threads.close(10) == 0


def test_close_cancels_calls_not_started_and_leaves_a_running_one_after_its_bound() -> None:
    release = threading.Event()
    threads = ModelThreads(1, "model")
    started = threading.Event()

    def stuck() -> None:
        started.set()
        release.wait()

    running = threads.submit(stuck)
    assert started.wait(10)
    queued = threads.submit(lambda: None)
    assert threads.close(0.2) == 1  # the stuck call's thread, a daemon
    assert queued.cancelled() and not running.done()
    assert all(t.daemon for t in threading.enumerate() if t.name == "model_0")
    with pytest.raises(UnavailableError, match="shutting down"):
        threads.submit(lambda: None)
    release.set()
    running.result(timeout=10)
