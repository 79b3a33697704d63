"""Read a message stream ahead of its consumer, on a thread of its own.

grpcio's synchronous API moves one message of a stream at a time: a server handler's request
iterator asks the transport for message i+1 only when the handler comes back for it, and a
client takes message i+1 from its request iterator only once message i is sent. Whatever work
is done per message (hashing and copying a chunk of weights) is then added to the time of every
message. A `Prefetcher` keeps up to `depth` messages ready, so that work overlaps the transport.

The receiving end (the sync servicer and the relay) always reads a push through a Prefetcher:
its reader can then wait with a timeout and end a push whose sender went silent. The sending
end (trainer_service/push.py) goes through `prefetched()`, which reads ahead only where there
are cores to spare (the hashes and copies release the GIL; on fewer than MIN_CPUS the extra
thread's hand-offs cost about what the overlap gains). `read_ahead()` overrides that choice for
the whole process: each service's main() passes it WEIGHTSYNC_PREFETCH (shared/settings.py).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Generic, TypeVar

from shared.cpus import available_cpus

T = TypeVar("T")

MIN_CPUS = 4
_END = object()
_forced: bool | None = None  # set by read_ahead(); None: by the CPUs this process may use


def read_ahead(choice: bool | None) -> None:
    """Whether `prefetched` reads ahead in this process: True always, False never, None where
    the process may use MIN_CPUS or more."""
    global _forced
    _forced = choice
    _worth_it.cache_clear()


@functools.cache
def _worth_it() -> bool:
    if _forced is not None:
        return _forced
    return available_cpus() >= MIN_CPUS


def prefetched(
    source: Iterator[T], name: str, depth: int = 4
) -> AbstractContextManager[Iterator[T]]:
    """`source` read ahead by a Prefetcher where `read_ahead` says so, else as is."""
    if not _worth_it():
        return nullcontext(source)
    return Prefetcher(source, depth, name)


class Prefetcher(Generic[T]):
    """Iterates `source` on a daemon thread, at most `depth` items ahead of the reader.

    An exception raised by `source` reaches the reader in its place in the stream. Close the
    prefetcher (or leave its `with` block) when done reading: the thread then stops at the next
    item it would queue, which for a gRPC stream is at the latest when the RPC ends.
    """

    def __init__(self, source: Iterable[T], depth: int = 4, name: str = "prefetch") -> None:
        self._queue: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(depth)
        self._closed = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._pull, args=(source,), name=name, daemon=True)
        self._thread.start()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        return self._unpack(self._queue.get())

    def waiting(self, every_s: float) -> Iterator[T | None]:
        """The items, with a None each time `every_s` passes without one: a reader can look
        elsewhere (for an early answer) while the source stalls."""
        while not self._finished:
            try:
                entry = self._queue.get(timeout=every_s)
            except queue.Empty:
                yield None
                continue
            try:
                item = self._unpack(entry)
            except StopIteration:
                return
            yield item

    def _unpack(self, entry: tuple[object, BaseException | None]) -> T:
        item, error = entry
        if error is not None:
            self._finished = True
            raise error
        if item is _END:
            self._finished = True
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._closed.set()

    def _pull(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as error:  # handed to the reader, raised there
            self._put((None, error))
            return
        self._put((_END, None))

    def _put(self, entry: tuple[object, BaseException | None]) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False
