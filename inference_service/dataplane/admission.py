"""Admission: the bounds on what the data plane holds for requests it has not answered yet.

A request is admitted once its tensors are decoded, before it queues for a batch or a worker,
and holds its place until its model has run (or it was dropped unrun): a model's requests in
flight are bounded, and so are the bytes of request tensors the whole service holds. Past
either bound a request gets RESOURCE_EXHAUSTED at once, so a flood costs the service neither
memory nor time without bound.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from inference_service import metrics
from shared.errors import ResourceLimitError


@dataclass(frozen=True)
class RequestLimits:
    # Above the batcher's queue bound (--max-queue, 1024), which answers first for a batched
    # model; a model run unbatched has no other bound on the requests waiting for a worker.
    max_requests_per_model: int = 2048
    # Sixteen requests of the data plane's largest message (64 MiB).
    max_bytes: int = 1 << 30


class Ticket:
    """One admitted request's place, held by `holders` (the model's run, and a stream's answer
    waiting for its client); each `release` gives one hold back (once per holder, from any
    thread), and the place is free when none is left."""

    def __init__(self, admission: Admission, model: str, nbytes: int, holders: int = 1) -> None:
        self._admission = admission
        self.model = model
        self.nbytes = nbytes
        self._holders = holders

    def release(self) -> None:
        self._admission.release(self)


class Admission:
    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._bytes = 0
        # The gauges read the counts when scraped: a request sets nothing on them.
        self._gauged: set[str] = set()  # models whose REQUESTS_IN_FLIGHT child reads this
        metrics.REQUEST_BYTES_IN_FLIGHT.set_function(lambda: self._bytes)

    def admit(self, model: str, nbytes: int, holders: int = 1) -> Ticket:
        """A place for one request of `model` whose tensors hold `nbytes`, given back once each
        of its `holders` has released it; ResourceLimitError if its model has the most
        requests in flight allowed, or its bytes would pass the service's bound."""
        most, budget = self.limits.max_requests_per_model, self.limits.max_bytes
        with self._lock:
            held = self._requests.get(model, 0)
            if held >= most:
                raise ResourceLimitError(
                    f"model {model!r}: {held} requests are in flight, the most the service "
                    f"takes (--max-requests-in-flight {most}); retry with backoff"
                )
            if nbytes > budget:
                raise ResourceLimitError(
                    f"the request's tensors take {nbytes} bytes, more than all requests in "
                    f"flight may hold together (--max-request-bytes-in-flight {budget}); send "
                    "fewer rows per request"
                )
            if self._bytes + nbytes > budget:
                raise ResourceLimitError(
                    f"requests in flight hold {self._bytes} bytes of tensors; this one's "
                    f"{nbytes} would pass the service's bound (--max-request-bytes-in-flight "
                    f"{budget}); retry with backoff"
                )
            self._requests[model] = held + 1
            self._bytes += nbytes
        if model not in self._gauged:
            self._gauge(model)
        return Ticket(self, model, nbytes, holders)

    def grow(self, ticket: Ticket, nbytes: int) -> None:
        """Count `nbytes` for `ticket` from now on where that is more than it holds: a stream's
        answer, which waits for its client in place of the request's tensors (its id and
        parameters echoed, its outputs). Never refused: the answer is built; the requests
        admitted after it see the bytes."""
        with self._lock:
            if ticket._holders <= 0 or nbytes <= ticket.nbytes:
                return
            self._bytes += nbytes - ticket.nbytes
            ticket.nbytes = nbytes

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._holders <= 0:
                return
            ticket._holders -= 1
            if ticket._holders:
                return
            held = self._requests[ticket.model] - 1
            self._requests[ticket.model] = held
            self._bytes -= ticket.nbytes

    def _gauge(self, model: str) -> None:
        """Make `model`'s in-flight gauge read its count here (once per model)."""
        requests = self._requests
        metrics.REQUESTS_IN_FLIGHT.labels(model).set_function(lambda: requests.get(model, 0))
        self._gauged.add(model)

    def in_flight(self, model: str) -> int:
        with self._lock:
            return self._requests.get(model, 0)

    @property
    def bytes_in_flight(self) -> int:
        with self._lock:
            return self._bytes
