"""Where a push's parts wait: the idle timeout, and the writer lease watched while they do.

Every transport (the in-process gRPC handler through a Prefetcher, the relay's push link) hands
a push's parts over as an iterator that yields None each TICK_S without one, so that a wait
for a sender that has gone quiet is never a blocking read nobody can interrupt. The push is
applied watching the writer lease through the inbox: a push whose writer another has fenced
ends at its next part or tick, letting go of the model for the new writer at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from shared.errors import PushStalledError

T = TypeVar("T", covariant=True)

# How often a transport reports a wait with no message (None).
TICK_S = 0.05


class Inbox(Iterator[T], Generic[T]):
    """A push's parts, from a transport that yields None each TICK_S without one.

    Waiting for a message, the inbox ends the push (PushStalledError) once `idle_timeout_s`
    passes without one; and at every part and every tick it runs the check `watch` set (the
    writer lease: a push whose writer another has fenced ends at once, not at its commit)."""

    def __init__(self, messages: Iterator[T | None], idle_timeout_s: float) -> None:
        self._messages = messages
        self._idle_timeout_s = idle_timeout_s
        self._check: Callable[[], None] = lambda: None
        self._what = ""

    def watch(self, check: Callable[[], None], what: str) -> None:
        """Run `check` (it raises to end the push) at every part and tick; `what` names the
        push in the message of a stall."""
        self._check = check
        self._what = what

    def __next__(self) -> T:
        waiting_since = time.monotonic()
        while True:
            message = next(self._messages)
            self._check()
            if message is not None:
                return message
            if time.monotonic() - waiting_since >= self._idle_timeout_s:
                raise PushStalledError(
                    f"the push{self._what} sent nothing for {self._idle_timeout_s:g}s; it was "
                    "ended and nothing was swapped"
                )
