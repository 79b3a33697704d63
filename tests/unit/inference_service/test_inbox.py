"""The Inbox a push's messages wait in: stalls end the push, and so does a fenced writer."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from inference_service.lease import WriterLease
from inference_service.syncplane.inbox import TICK_S, Inbox
from shared.errors import FencedError, PushStalledError
from shared.grpc.prefetch import Prefetcher


def test_messages_pass_through_and_ticks_do_not() -> None:
    inbox = Inbox(iter([None, b"a", None, None, memoryview(b"b")]), idle_timeout_s=60)
    assert [bytes(m) for m in inbox] == [b"a", b"b"]


def test_a_source_that_sends_nothing_ends_the_push() -> None:
    inbox = Inbox(itertools.repeat(None), idle_timeout_s=0.05)
    inbox.watch(lambda: None, " of 'm' version 2 from 'a'")
    with pytest.raises(
        PushStalledError,
        match=r"the push of 'm' version 2 from 'a' sent nothing for 0\.05s; it was ended",
    ):
        next(inbox)


def test_a_stalled_sender_read_ahead_on_a_thread_is_ended() -> None:
    release = threading.Event()

    def stalls() -> Iterator[bytes]:
        yield b"header"
        release.wait(30)
        yield b"late"

    try:
        with Prefetcher(stalls()) as ahead:
            inbox = Inbox(ahead.waiting(TICK_S), idle_timeout_s=0.2)
            assert next(inbox) == b"header"
            with pytest.raises(PushStalledError, match=r"sent nothing for 0\.2s"):
                next(inbox)
        assert not release.is_set()
    finally:
        release.set()


def test_a_writer_fenced_while_the_push_waits_ends_it() -> None:
    lease = WriterLease("m")
    epoch = lease.grant("a")
    inbox = Inbox(iter([b"header", None, b"data"]), idle_timeout_s=60)
    inbox.watch(lambda: lease.check(epoch, "a"), "")
    assert next(inbox) == b"header"
    lease.grant("b")
    with pytest.raises(FencedError, match="carries epoch 1 and is fenced"):
        next(inbox)  # at the tick, before the next message
