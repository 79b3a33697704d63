"""The sync plane takes the pings of a link watched by its client (`watched_link`: a replica
passing a push on, a trainer's Seed), about one a second for as long as a push is open, and
tells a client flooding it with pings, before any authentication, to go away: an HTTP/2 GOAWAY
with ENHANCE_YOUR_CALM ("too_many_pings"), the connection closed, and the service serving and
taking pushes as before. Both the in-process sync plane and the sync relay."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from inference_service.syncplane.forward import PeerAccess
from shared.gen.weightsync.v1 import weightsync_pb2 as pb
from shared.grpc.channel import open_channel
from shared.grpc.options import SYNC_MAX_MESSAGE_BYTES, watched_link
from shared.weights.digest import state_digest
from shared.weights.writer import Payload
from tests.integration.conftest import Services, wait_until
from tests.integration.stamp_writer import PUSH, STAMP, StampWriter, pushed_once, stamp_state

MB = 1
TOKEN = "sync-secret"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1
ENHANCE_YOUR_CALM = 0xB
FLOOD = 1000  # pings sent at most


def frame(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One HTTP/2 frame on stream 0."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + bytes(4) + payload


class Frames:
    """The frames a raw HTTP/2 connection receives, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def next(self) -> tuple[int, int, bytes] | None:
        """The next frame's type, flags and payload; None once the server closed."""
        while True:
            if len(self._buffer) >= 9:
                size = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + size:
                    kind, flags = self._buffer[3], self._buffer[4]
                    payload = self._buffer[9 : 9 + size]
                    self._buffer = self._buffer[9 + size :]
                    return kind, flags, payload
            try:
                data = self._sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self._buffer += data


def flood(address: str) -> tuple[int, bytes | None, bool]:
    """Ping `address` from a raw HTTP/2 connection (no call, no token) as fast as it answers,
    up to FLOOD pings: how many it acknowledged, its GOAWAY's payload (None: none came), and
    whether it closed the connection after it."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(PREFACE + frame(SETTINGS))
        frames = Frames(sock)
        acked = 0
        for n in range(FLOOD):
            opaque = n.to_bytes(8, "big")
            try:
                sock.sendall(frame(PING, opaque))
            except (BrokenPipeError, ConnectionResetError):
                break
            while (received := frames.next()) is not None:
                kind, flags, payload = received
                if kind == GOAWAY:
                    while frames.next() is not None:  # it must close the connection now
                        pass
                    return acked, payload, True
                if kind == PING and flags & ACK and payload == opaque:
                    acked += 1
                    break
            else:
                return acked, None, True  # closed without a GOAWAY
        return acked, None, False


class PingCounter:
    """A TCP proxy in front of `target` counting the PING frames clients send through it."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.pings = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:  # the target is gone: so is this client
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        buffer = b""
        preface = count
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
            if not count:
                continue
            buffer += data
            if preface:
                if len(buffer) < len(PREFACE):
                    continue
                buffer, preface = buffer[len(PREFACE) :], False
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                size = int.from_bytes(buffer[:3], "big")
                if buffer[3] == PING and not buffer[4] & ACK:
                    self.pings += 1
                buffer = buffer[9 + size :]
        for end in (sink, source):  # both directions end; closed here, not left to the GC
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@pytest.fixture
def counter() -> Iterator[list[PingCounter]]:
    started: list[PingCounter] = []
    yield started
    for proxy in started:
        proxy.close()


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_ping_flood_gets_goaway_and_the_service_carries_on(
    services: Services, relay: str
) -> None:
    inference, writer, served = pushed_once(services, relay, TOKEN, MB)

    acked, goaway, closed = flood(inference.sync)

    assert goaway is not None, f"no GOAWAY: the sync plane acknowledged all {acked} pings"
    assert acked < 10, f"GOAWAY only after {acked} pings"
    code = int.from_bytes(goaway[4:8], "big")
    assert code == ENHANCE_YOUR_CALM, f"GOAWAY error code {code:#x}"
    assert goaway[8:] == b"too_many_pings"
    assert closed, "the connection stayed open after the GOAWAY"
    now = inference.model_state("stamp", token=TOKEN)
    assert (now.version, now.digest) == (served.version, served.digest)
    assert not now.HasField("pending")
    digest = writer.push(4.0, 2)  # and it still takes a push
    now = inference.model_state("stamp", token=TOKEN)
    assert (now.version, now.digest) == (2, digest)
    log = inference.log.read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.parametrize("relay", ["on", "off"])
def test_a_watched_link_pinging_through_a_long_push_is_kept(
    services: Services, counter: list[PingCounter], relay: str
) -> None:
    """A push held open, the server sending nothing, while the client's watched link pings
    four times (three would be too many at gRPC's default floor of 5 minutes): committed."""
    services.env.update(INFERENCE_SYNC_TOKEN=TOKEN, TEST_STAMP_MB=str(MB))
    inference = services.inference(STAMP, "--sync-relay", relay, "--push-idle-timeout-s", "60")
    proxy = PingCounter(inference.sync)
    counter.append(proxy)
    channel = open_channel(
        proxy.address,
        SYNC_MAX_MESSAGE_BYTES,
        token=TOKEN,
        options=watched_link(PeerAccess.stall_timeout_s),  # its fastest pings (forward.py)
    )
    writer = StampWriter(channel, MB)
    epoch = writer.acquire()
    state = stamp_state(MB, 5.0)
    payload = Payload.of(list(state.items()))
    digest = state_digest(state)

    def messages() -> Iterator[bytes]:
        header = pb.PushHeader(
            model_name="stamp",
            version=1,
            writer_id="tests",
            payload_bytes=payload.nbytes,
            writer_epoch=epoch,
        )
        yield pb.PushRequest(header=header).SerializeToString()
        pinged = proxy.pings
        wait_until(lambda: proxy.pings >= pinged + 4, timeout=30)
        for chunk in payload.chunks():
            yield pb.PushRequest(data=chunk).SerializeToString()
        yield pb.PushRequest(commit=pb.PushCommit(digest=digest)).SerializeToString()

    push = channel.stream_unary(
        PUSH, request_serializer=None, response_deserializer=pb.PushResponse.FromString
    )
    response = push(messages(), timeout=60)
    assert response.version == 1
    now = inference.model_state("stamp", token=TOKEN)
    assert (now.version, now.digest) == (1, digest)
