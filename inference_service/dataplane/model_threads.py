"""The threads that run model calls of models not batched.

Daemon threads, unlike a ThreadPoolExecutor's: the interpreter joins those at exit, so one model
call that never returns (a hung GPU op, a model stuck in a loop) would hold a stopped service's
process for good. A service that has drained waits a bounded time for the calls still running
(`close`), then ends without them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from shared.errors import UnavailableError

T = TypeVar("T")
_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class ModelThreads:
    """`threads` daemon threads named `{name}_{i}`, started by the first call, each running
    `initializer` first, taking calls in the order they were submitted."""

    def __init__(
        self, threads: int, name: str, initializer: Callable[[], None] | None = None
    ) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._initializer = initializer
        self._closed = False
        self._lock = threading.Lock()
        self._count = threads
        self._name = name
        self._threads: list[threading.Thread] = []  # started by the first call

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on one of the threads; its future."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            if not self._threads:
                self._start()
            self._calls.put((future, fn, args))
        return future

    def _start(self) -> None:
        for i in range(self._count):
            thread = threading.Thread(target=self._work, name=f"{self._name}_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout_s: float) -> int:
        """Take no more calls, cancel those not started, and wait up to `timeout_s` seconds for
        those running; return how many threads still run one."""
        self.stop()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        """Take no more calls and cancel those not started; the threads end once their calls
        running have returned."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[0].cancel()
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as error:  # the caller's to see, as an executor hands it over
                future.set_exception(error)
            else:
                future.set_result(result)
