"""The push link between the sync relay and the service, over a real Unix socket and memfd ring:
push parts and answers carried as they are, nothing encoded again or parsed at the service."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from inference_service.syncplane import messages, parts
from inference_service.syncplane.inbox import TICK_S, Inbox
from inference_service.syncplane.parts import Commit, Empty, Part, PushHeader, PushOutcome
from inference_service.syncplane.relay import supervisor
from inference_service.syncplane.relay.frames import Answer, decode_answer, encode_answer
from inference_service.syncplane.relay.link import RelayLink
from inference_service.syncplane.relay.service_end import PushStream, ServiceLink
from inference_service.syncplane.relay.supervisor import relay_wanted
from shared.errors import MalformedPushError, PushStalledError
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.errors import Status
from shared.grpc.prefetch import Prefetcher
from shared.weights import wire

OK = PushOutcome("m", 1, b"d" * 16, 0)
HEADER = PushHeader("m", 7, 6, "trainer-é", 1 << 40, (1 << 63) - 1)


class Service:
    """A service end that runs `handle` on each push and answers with what it returns."""

    def __init__(self, path: Path, handle: Callable[[PushStream], Answer]) -> None:
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


def service(path: Path, handle: Callable[[PushStream], Answer]) -> None:
    OPENED.append(Service(path, handle))


def relay(path: Path) -> RelayLink:
    link = RelayLink(str(path), slots=2, slot_bytes=64)
    OPENED.append(link)
    return link


def refused(message: str) -> Status:
    return Status(grpc.StatusCode.INVALID_ARGUMENT, "malformed-push", message)


def collect(into: list[list[Part]]) -> Callable[[PushStream], Answer]:
    """Keep each push's parts (data copied: a view lasts until the next part); answer OK, or
    with what ended the stream."""

    def handle(stream: PushStream) -> Answer:
        received: list[Part] = []
        into.append(received)
        try:
            for part in stream:
                received.append(bytes(part) if isinstance(part, memoryview) else part)
        except parts.SenderGone:
            return Status(grpc.StatusCode.CANCELLED, "cancelled", "gone")
        except MalformedPushError as error:
            return refused(str(error))
        return PushOutcome("m", len(received), b"", 0)

    return handle


def chunks(count: int, size: int) -> list[bytes]:
    return [bytes([i % 251]) * size for i in range(count)]


def test_parts_arrive_as_themselves_with_data_joined_in_few_slots(path: Path) -> None:
    seen: list[list[Part]] = []
    service(path, collect(seen))
    link = relay(path)  # 64-byte slots
    data = chunks(7, 20)
    sent: list[Part] = [HEADER, *data, b"x" * 100, Empty(), b"y" * 3, Commit(b"\x01" * 16)]
    answer = link.push(iter(sent))
    assert answer == PushOutcome("m", 8, b"", 0)
    header, *joined, large, empty, small, commit = seen[0]
    assert (header, large, empty, small, commit) == (
        HEADER,
        b"x" * 100,
        Empty(),
        b"y" * 3,
        sent[-1],
    )
    # three 20-byte chunks fit a slot: 3 + 3 + 1; data before another part is handed over first
    assert joined == [b"".join(data[:3]), b"".join(data[3:6]), data[6]]
    again = [HEADER, *chunks(9, 50), Commit(b"")]  # the same link and ring, the next push
    assert link.push(iter(again)) == PushOutcome("m", 11, b"", 0)
    assert seen[1] == again


def test_answers_cross_as_they_are() -> None:
    # (the RESULT frame's encoding; the other tests carry answers over a real link)
    for answer in (
        PushOutcome("modèle", (1 << 63) - 1, bytes(range(16)), 1 << 40, finish_s=0.125),
        Status(grpc.StatusCode.ABORTED, "fenced", "written by 'b' (epoch 2)"),
        Status(grpc.StatusCode.INTERNAL, "", "internal server error; see the server log"),
    ):
        assert decode_answer(*encode_answer(answer)) == answer


def test_a_sender_that_goes_away_is_seen_in_place_and_the_link_stays_usable(path: Path) -> None:
    seen: list[list[Part]] = []
    service(path, collect(seen))
    link = relay(path)

    def broken() -> Iterator[Part]:
        yield HEADER
        yield b"a" * 10
        yield b"b" * 10
        raise parts.SenderGone()

    assert link.push(broken()) == Status(grpc.StatusCode.CANCELLED, "cancelled", "gone")
    assert seen == [[HEADER, b"a" * 10 + b"b" * 10]]  # joined data before the end is not lost
    assert link.healthy
    assert link.push(iter([b"c"])) == PushOutcome("m", 1, b"", 0)


def test_a_message_the_relay_cannot_decode_is_refused_in_its_place(path: Path) -> None:
    seen: list[list[Part]] = []
    service(path, collect(seen))
    link = relay(path)
    header = pb.PushRequest(header=pb.PushHeader(model_name="m", version=2)).SerializeToString()
    sent = [header, wire.encode_data([b"abc"]), b"\xff\xff\xff\xff", wire.encode_data([b"late"])]
    answer = link.push(messages.parts(iter(sent)))
    assert answer == refused("a push message is not a valid weightsync.v1.PushRequest")
    assert seen == [[PushHeader("m", 2, 0, "", 0), b"abc"]]
    assert link.push(iter([b"ok"])) == PushOutcome("m", 1, b"", 0)  # the link is clean


def test_an_answer_part_way_stops_the_relay_and_the_next_push_starts_clean(
    path: Path,
) -> None:
    def refuse_after_two(stream: PushStream) -> Answer:
        taken = [next(stream), next(stream)]
        if taken[0] == HEADER:
            for _ in stream:
                pass
            return OK
        return refused("bad")

    service(path, refuse_after_two)
    link = relay(path)
    pulled = 0

    def many() -> Iterator[Part]:
        nonlocal pulled
        for part in [Empty(), *chunks(1000, 64)]:
            pulled += 1
            yield part

    assert link.push(many()) == refused("bad")
    assert pulled < 1000  # it stopped taking the sender's parts
    assert link.push(iter([HEADER, b"x" * 100, Commit(b"")])) == OK


def test_a_sender_that_stalls_after_a_refusal_still_gets_it(path: Path) -> None:
    gone = Status(grpc.StatusCode.NOT_FOUND, "model-not-found", "no such")

    def refuse_the_first(stream: PushStream) -> Answer:
        next(stream)
        return gone

    service(path, refuse_the_first)
    link = relay(path)
    release = threading.Event()

    def stalls() -> Iterator[Part]:
        yield HEADER
        release.wait(30)  # the sender holds its stream open and sends nothing more
        yield b"late"

    try:
        with Prefetcher(stalls()) as ahead:
            assert link.push(ahead.waiting(0.01)) == gone
        assert not release.is_set()  # answered while the sender was still stalled
    finally:
        release.set()
    assert link.push(iter([HEADER])) == gone  # the link is clean


def test_a_link_whose_service_went_away_raises(path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    OPENED.append(listener)
    listener.bind(str(path))
    listener.listen()
    link = relay(path)
    accepted, _ = listener.accept()
    ServiceLink(accepted).close()
    with pytest.raises(OSError):
        link.push(iter(chunks(100, 64)))
    assert not link.healthy


def test_the_relay_runs_where_there_are_cpus_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    assert relay_wanted("on") and not relay_wanted("off")
    monkeypatch.setattr(supervisor, "available_cpus", lambda: 2)
    assert not relay_wanted("auto")
    monkeypatch.setattr(supervisor, "available_cpus", lambda: 4)
    assert relay_wanted("auto")


def test_a_push_that_goes_quiet_is_seen_by_the_service_and_ended(path: Path) -> None:
    """The service waits on the link in ticks, from the push's start (before any part), so
    its idle timeout covers a sender that never sends even a header."""

    def time_out(stream: PushStream) -> Answer:
        taken: list[Part] = []
        try:
            for part in Inbox(stream.waiting(TICK_S), idle_timeout_s=0.2):
                taken.append(part)
        except PushStalledError as error:
            return Status(grpc.StatusCode.DEADLINE_EXCEEDED, "", f"{len(taken)}: {error}")
        return OK

    service(path, time_out)
    link = relay(path)
    release = threading.Event()

    def stalls(*sent: Part) -> Iterator[Part]:
        yield from sent
        release.wait(30)

    try:
        for sent in ([HEADER], []):
            with Prefetcher(stalls(*sent)) as ahead:
                answer = link.push(ahead.waiting(0.01))
            assert isinstance(answer, Status)
            assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert answer.message.startswith(f"{len(sent)}: the push sent nothing for 0.2s")
        assert not release.is_set()
    finally:
        release.set()
    assert link.push(iter([b"x"])) == OK  # the link is clean
