"""The host copy of a published version that a lagging target is caught up from, made while the
push runs wherever that can be foreseen, so that a sync leaving a target behind does not pay
for the copy after its push (128 MiB took 50 to 200 ms on a busy two-core host).

The copy must be finished before the sync returns: the caller writes its tensors again right
after (the next training step). It is started early when a target lags before the push starts
(the sync will leave it behind for the catch-up), or once the push runs late: past LATE times
the quickest of the model's recent syncs, and LATE_BY_S past it (a target cut mid-push makes a
push late: the hops after it are fed past it), where the push has more than one target (with
one, a sync that leaves it behind has failed anyway). A copy started and not needed is dropped
(while it lives, the host holds one more copy of the model); one needed and not started is
made when asked for.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Mapping
from concurrent.futures import Executor, Future
from typing import Self

import torch

from shared.weights.ties import map_tied

Tensors = Mapping[str, torch.Tensor]

# A push is late past LATE times the model's usual sync and at least LATE_BY_S past it: a hop
# cut mid-push costs the chain the replicas' forward stall bound (0.5 s by default), while a
# short push that merely runs slow on a busy host should not pay for a copy it never needs.
LATE = 1.25
LATE_BY_S = 0.25
RECENT = 8  # syncs of a model whose quickest is its usual time


def host_copy(tensors: Tensors, owned: Collection[str]) -> dict[str, torch.Tensor]:
    """A copy of `tensors` on the host that the caller's later writes leave alone, each tensor
    copied once (tied names stay tied); the tensors it `owned` (made for the push, never
    written again) are kept as they are."""

    def copied(name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if name in owned and tensor.device.type == "cpu":
            return tensor
        return tensor.to("cpu", copy=True)

    return map_tied(tensors, copied)


class HostCopy:
    """One version's host copy, made on `pool` once started, or when asked for."""

    def __init__(self, pool: Executor, tensors: Tensors, owned: Collection[str]) -> None:
        self._pool = pool
        self._tensors = tensors
        self._owned = owned
        self._lock = threading.Lock()
        self._future: Future[dict[str, torch.Tensor]] | None = None
        self._timer: threading.Timer | None = None
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def started(self) -> bool:
        """Whether the copy has begun."""
        return self._future is not None

    def start(self) -> None:
        """Begin the copy now, unless it began already or the sync has ended."""
        with self._lock:
            if self._future is None and not self._closed:
                self._future = self._pool.submit(host_copy, self._tensors, self._owned)

    def start_after(self, seconds: float) -> None:
        """Begin the copy in `seconds` if the sync is still running then."""
        timer = threading.Timer(seconds, self.start)
        timer.daemon = True
        with self._lock:
            self._timer = timer
        timer.start()

    def result(self) -> dict[str, torch.Tensor]:
        """The copy: the one begun, else made now."""
        self.close()
        future = self._future
        return host_copy(self._tensors, self._owned) if future is None else future.result()

    def close(self) -> None:
        """The sync is ending: begin nothing more (a copy begun and not asked for is dropped)."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()


class UsualSyncs:
    """Per model, how long its syncs take when every target commits: the quickest of the last
    RECENT (the first syncs, which open connections and push everything whole, are forgotten
    soon)."""

    def __init__(self) -> None:
        self._seconds: dict[str, deque[float]] = {}

    def late_after(self, model: str) -> float | None:
        """When a sync of `model` is late (None: no sync of it measured yet)."""
        recent = self._seconds.get(model)
        if not recent:
            return None
        usual = min(recent)
        return max(LATE * usual, usual + LATE_BY_S)

    def record(self, model: str, seconds: float) -> None:
        self._seconds.setdefault(model, deque(maxlen=RECENT)).append(seconds)
