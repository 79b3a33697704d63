"""The push link between the sync relay and the service, over a real Unix socket and memfd ring."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from inference_service.syncplane import convert, relay_process
from inference_service.syncplane.inbox import TICK_S, Inbox
from inference_service.syncplane.link import (
    PushStream,
    RelayedCancel,
    RelayLink,
    Result,
    ServiceLink,
)
from inference_service.syncplane.relay_process import relay_wanted
from shared.errors import MalformedPushError, PushStalledError
from shared.grpc.prefetch import Prefetcher
from shared.weights import wire

OK = grpc.StatusCode.OK


class Service:
    """A service end that runs `handle` on each push and answers with what it returns."""

    def __init__(self, path: Path, handle: Callable[[PushStream], Result]) -> None:
        self.seen: list[list[bytes]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._handle = handle
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        sock, _ = self._listener.accept()
        link = ServiceLink(sock)
        for stream in link.pushes():
            stream.answer(self._handle(stream))
        link.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    """Where a test's service listens; its sockets and links are closed afterwards."""
    yield tmp_path / "s"
    for opened in OPENED:
        opened.close()
    OPENED.clear()


OPENED: list[Service | RelayLink | socket.socket] = []


def service(path: Path, handle: Callable[[PushStream], Result]) -> Service:
    OPENED.append(Service(path, handle))
    return OPENED[-1]  # type: ignore[return-value]


def relay(path: Path) -> RelayLink:
    link = RelayLink(str(path), slots=2, slot_bytes=64)
    OPENED.append(link)
    return link


def collect(into: list[list[bytes]]) -> Callable[[PushStream], Result]:
    def handle(stream: PushStream) -> Result:
        messages: list[bytes] = []
        try:
            for message in stream:
                messages.append(bytes(message))  # copied: a view lasts until the next message
        except RelayedCancel:
            into.append(messages)
            return Result(grpc.StatusCode.CANCELLED, reason="cancelled", message="gone")
        into.append(messages)
        return Result(OK, b"done %d" % len(messages))

    return handle


def messages(count: int, size: int) -> list[bytes]:
    return [bytes([i % 251]) * size for i in range(count)]


def test_messages_arrive_in_order_through_few_slots_and_large_ones_inline(path: Path) -> None:
    seen: list[list[bytes]] = []
    service(path, collect(seen))
    link = relay(path)
    sent = [*messages(20, 64), b"x" * 1000, *messages(5, 3)]
    assert link.push(iter(sent)) == Result(OK, b"done 26")
    assert seen == [sent]
    again = messages(7, 50)  # the same link and ring, the next push
    assert link.push(iter(again)) == Result(OK, b"done 7")
    assert seen[1] == again


def test_a_broken_source_aborts_the_push_and_the_link_stays_usable(path: Path) -> None:
    seen: list[list[bytes]] = []
    service(path, collect(seen))
    link = relay(path)

    def broken() -> Iterator[bytes]:
        yield b"a" * 10
        yield b"b" * 10
        raise grpc.RpcError()

    result = link.push(broken())
    assert (result.code, result.reason, result.message) == (
        grpc.StatusCode.CANCELLED,
        "cancelled",
        "gone",
    )
    assert seen == [[b"a" * 10, b"b" * 10]]
    assert link.healthy
    assert link.push(iter([b"c"])) == Result(OK, b"done 1")


def test_an_answer_part_way_stops_the_relay_and_the_next_push_starts_clean(
    path: Path,
) -> None:
    def refuse_after_two(stream: PushStream) -> Result:
        taken = [bytes(next(stream)), bytes(next(stream))]
        if taken[0] == b"ok":
            for _ in stream:
                pass
            return Result(OK, b"fine")
        return Result(grpc.StatusCode.INVALID_ARGUMENT, reason="malformed-push", message="bad")

    service(path, refuse_after_two)
    link = relay(path)
    pulled = 0

    def many() -> Iterator[bytes]:
        nonlocal pulled
        for message in [b"no", *messages(1000, 64)]:
            pulled += 1
            yield message

    result = link.push(many())
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT and result.message == "bad"
    assert pulled < 1000  # it stopped taking the sender's messages
    assert link.push(iter([b"ok", b"x" * 100, b"y"])) == Result(OK, b"fine")


def test_a_sender_that_stalls_after_a_refusal_still_gets_it(path: Path) -> None:
    def refuse_the_first(stream: PushStream) -> Result:
        next(stream)
        return Result(grpc.StatusCode.NOT_FOUND, reason="model-not-found", message="no such")

    service(path, refuse_the_first)
    link = relay(path)
    release = threading.Event()

    def stalls() -> Iterator[bytes]:
        yield b"header"
        release.wait(30)  # the sender holds its stream open and sends nothing more
        yield b"late"

    try:
        with Prefetcher(stalls()) as ahead:
            result = link.push(ahead.waiting(0.01))
        assert result.code == grpc.StatusCode.NOT_FOUND and result.message == "no such"
        assert not release.is_set()  # answered while the sender was still stalled
    finally:
        release.set()
    assert link.push(iter([b"ok"])).code == grpc.StatusCode.NOT_FOUND  # the link is clean


def test_a_link_whose_service_went_away_raises(path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    OPENED.append(listener)
    listener.bind(str(path))
    listener.listen()
    link = relay(path)
    accepted, _ = listener.accept()
    ServiceLink(accepted).close()
    with pytest.raises(OSError):
        link.push(iter(messages(100, 64)))
    assert not link.healthy


def test_the_relay_runs_where_there_are_cpus_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    assert relay_wanted("on") and not relay_wanted("off")
    monkeypatch.setattr(relay_process, "available_cpus", lambda: 2)
    assert not relay_wanted("auto")
    monkeypatch.setattr(relay_process, "available_cpus", lambda: 4)
    assert relay_wanted("auto")


def test_consecutive_data_messages_reach_the_service_joined(path: Path) -> None:
    seen: list[list[bytes]] = []
    service(path, collect(seen))
    link = relay(path)  # 64-byte slots: 53 bytes of payload each
    chunks = [bytes([i]) * 20 for i in range(1, 8)]
    sent = [b"H" * 30, *(wire.encode_data([chunk]) for chunk in chunks), b"C" * 10]
    assert link.push(iter(sent)).code == OK
    first, *joined, last = seen[0]
    assert (first, last) == (b"H" * 30, b"C" * 10)  # other messages keep their place
    payloads = [wire.data_payload(message) for message in joined]
    assert len(payloads) == 4  # two 20-byte chunks fit a slot: 2 + 2 + 2 + 1
    assert b"".join(bytes(p) for p in payloads if p is not None) == b"".join(chunks)
    assert all(p is not None for p in payloads)


def test_a_push_that_goes_quiet_is_seen_by_the_service_and_ended(path: Path) -> None:
    """The service waits on the link in ticks, from the push's start (before any message), so
    its idle timeout covers a sender that never sends even a header."""

    def time_out(stream: PushStream) -> Result:
        taken: list[bytes] = []
        try:
            for message in Inbox(stream.waiting(TICK_S), idle_timeout_s=0.2):
                taken.append(bytes(message))
        except PushStalledError as error:
            return Result(grpc.StatusCode.DEADLINE_EXCEEDED, message=f"{taken}: {error}")
        return Result(OK, b"done")

    service(path, time_out)
    link = relay(path)
    release = threading.Event()

    def stalls(*sent: bytes) -> Iterator[bytes]:
        yield from sent
        release.wait(30)

    try:
        for sent in ([b"header"], []):
            with Prefetcher(stalls(*sent)) as ahead:
                result = link.push(ahead.waiting(0.01))
            assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert result.message.startswith(f"{sent}: the push sent nothing for 0.2s")
        assert not release.is_set()
    finally:
        release.set()
    assert link.push(iter([b"x"])) == Result(OK, b"done")  # the link is clean


def test_a_push_cancelled_before_its_header_is_refused_as_such(path: Path) -> None:
    def read_the_header(stream: PushStream) -> Result:
        try:
            convert.read_header(stream)
        except MalformedPushError as error:
            return Result(grpc.StatusCode.INVALID_ARGUMENT, message=str(error))
        return Result(OK, b"a header")

    service(path, read_the_header)

    def cancelled() -> Iterator[bytes]:
        raise grpc.RpcError()
        yield b""  # pragma: no cover - a generator that fails at its first item

    result = relay(path).push(cancelled())
    assert result == Result(
        grpc.StatusCode.INVALID_ARGUMENT,
        message="the sender cancelled the push before its header",
    )
