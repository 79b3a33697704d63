"""The push link's frames, and how push parts and answers are written in them.

A frame is a kind and three numbers (FRAME), some followed by `c` bytes inline:

    relay -> service   HELLO (with the ring's fd), then per push: BEGIN, then the parts:
                       HEADER, SLOT | DATA (payload), COMMIT, EMPTY; then END | ABORT | BAD
    service -> relay   FREE (a slot read), RESULT (the push's answer)

SLOT says that ring slot `a` holds `c` payload bytes; DATA carries payload too large for a slot
inline. A push ends with END (the stream ended), ABORT (the sender went away, or the service
answered before the end) or BAD (the relay could not decode a message: the inline text says
why). An END the relay closed the link after counts as ABORT: the relay gave up on the push
(its watch found the service stopped or stuck) and its sender has a failure. A RESULT is the
PushOutcome or the Status the push is answered with.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable

import grpc

from inference_service.syncplane.parts import Hop, HopResult, PushHeader, PushOutcome
from inference_service.syncplane.relay.pulse import Pulse
from shared.grpc.errors import Status

FRAME = struct.Struct("<BIIQ")  # kind, a, b, c
HELLO, BEGIN, HEADER, SLOT, DATA, COMMIT, EMPTY, END, ABORT, BAD, FREE, RESULT = range(1, 13)
INLINE = frozenset({HEADER, DATA, COMMIT, BAD, RESULT})  # frames followed by `c` bytes
ENDS = frozenset({END, ABORT, BAD})  # frames that end a push's stream

# version, base_version, payload_bytes, writer_epoch, resume_from, name size, writer size; then
# the route
_HEADER = struct.Struct("<QQQQQII")
# version, payload_bytes, finish_s, digest size, name size; then hops
_OUTCOME = struct.Struct("<QQdII")
CODES = {code.value[0]: code for code in grpc.StatusCode}
Answer = PushOutcome | Status


class ServiceStopped(ConnectionError):
    """The service's process no longer runs (stopped, or gone) while the relay waits on it."""


class ServiceWatch:
    """Whether the service's process runs, asked while the relay waits on its push link.

    The link carries no pings: the service's end is the push handler's own thread, busy for as
    long as a part takes to apply, a commit to check or a swap to wait for requests. So the
    relay asks the kernel, and, with a `pulse`, the service's heartbeat thread (relay/pulse.py):
    a service whose process has been stopped (SIGSTOP, a debugger) for `silent_s`, that has
    left a heartbeat unanswered for `silent_s` (frozen, stuck in the kernel or a driver), or
    that is gone, raises ServiceStopped; one that runs, however slowly, is waited for."""

    def __init__(self, pid: int, silent_s: float, pulse: Pulse | None = None) -> None:
        self.pid = pid
        self.silent_s = silent_s
        self._pulse = pulse
        self._since: float | None = None  # when it was first seen stopped, this time

    def __call__(self) -> None:
        state = _process_state(self.pid)
        if state is None or os.getppid() != self.pid:
            raise ServiceStopped(f"its process (pid {self.pid}) is gone")
        if state not in "Tt":
            self._since = None
            self._check_pulse()
            return
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since >= self.silent_s:
            raise ServiceStopped(
                f"its process (pid {self.pid}) has been stopped for {now - self._since:.1f} s"
            )

    def _check_pulse(self) -> None:
        if self._pulse is None:
            return
        try:
            waited = self._pulse.waited_s()
        except ConnectionError as exc:
            raise ServiceStopped(f"its process (pid {self.pid}) has no heartbeat: {exc}") from exc
        if waited >= self.silent_s:
            raise ServiceStopped(
                f"its process (pid {self.pid}) is stuck: it has left a heartbeat unanswered for "
                f"{waited:.1f} s (frozen, or hung in the kernel or a driver)"
            )


def _process_state(pid: int) -> str | None:
    """The state letter /proc gives process `pid` (R, S, D, T, t, Z, ...); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in "ZX" else state


def encode_header(header: PushHeader) -> bytes:
    name, writer = header.model_name.encode(), header.writer_id.encode()
    numbers = (
        header.version,
        header.base_version,
        header.payload_bytes,
        header.writer_epoch,
        header.resume_from,
    )
    route = json.dumps([[h.address, h.server_name, h.writer_epoch] for h in header.route])
    return _HEADER.pack(*numbers, len(name), len(writer)) + name + writer + route.encode()


def decode_header(data: bytes) -> PushHeader:
    version, base_version, payload_bytes, writer_epoch, resume_from, size, writer_size = (
        _HEADER.unpack_from(data)
    )
    start = _HEADER.size
    name = data[start : start + size].decode()
    writer_id = data[start + size : start + size + writer_size].decode()
    route = tuple(Hop(*hop) for hop in json.loads(data[start + size + writer_size :]))
    return PushHeader(
        name, version, base_version, writer_id, payload_bytes, writer_epoch, route, resume_from
    )


def encode_answer(answer: Answer) -> tuple[int, bytes]:
    """The RESULT frame's code and bytes for `answer`."""
    if isinstance(answer, PushOutcome):
        name = answer.model_name.encode()
        numbers = _OUTCOME.pack(
            answer.version, answer.payload_bytes, answer.finish_s, len(answer.digest), len(name)
        )
        hops = json.dumps(
            [[h.address, h.version, h.code, h.reason, h.message] for h in answer.hops]
        )
        return grpc.StatusCode.OK.value[0], numbers + answer.digest + name + hops.encode()
    return answer.code.value[0], f"{answer.reason}\0{answer.message}".encode()


def decode_answer(code: int, data: bytes) -> Answer:
    status = CODES.get(code, grpc.StatusCode.UNKNOWN)
    if status is grpc.StatusCode.OK:
        version, payload_bytes, finish_s, size, name_size = _OUTCOME.unpack_from(data)
        digest = data[_OUTCOME.size : _OUTCOME.size + size]
        name = data[_OUTCOME.size + size : _OUTCOME.size + size + name_size].decode()
        hops = tuple(
            HopResult(*hop) for hop in json.loads(data[_OUTCOME.size + size + name_size :])
        )
        return PushOutcome(name, version, digest, payload_bytes, hops, finish_s)
    reason, _, message = data.decode(errors="replace").partition("\0")
    return Status(status, reason, message)


class Frames:
    """Frames over one connected Unix stream socket, read through a buffer (a few frames often
    arrive together, and each saved read is a system call saved per megabyte pushed).

    With a `watch`, no read or write waits on the peer for longer than `every_s` without
    calling it: it raises (ServiceStopped) where the peer will not be waited for any longer."""

    def __init__(
        self,
        sock: socket.socket,
        watch: Callable[[], None] | None = None,
        every_s: float = 1.0,
    ) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._watch = watch
        self._every_s = every_s

    def send(
        self, kind: int, a: int = 0, b: int = 0, c: int = 0, data: bytes | memoryview = b""
    ) -> None:
        self._sendall(FRAME.pack(kind, a, b, c))
        if data:
            self._sendall(data)

    def _sendall(self, data: bytes | memoryview) -> None:
        if self._watch is None:
            self.sock.sendall(data)
            return
        view = memoryview(data).cast("B")
        while view:
            try:
                sent = self.sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._wait(writing=True)
                continue
            view = view[sent:]

    def _wait(self, writing: bool) -> None:
        """Wait until the socket can be written (or read), asking the watch every `every_s`."""
        assert self._watch is not None
        reading, writable = ([], [self.sock]) if writing else ([self.sock], [])
        while not any(select.select(reading, writable, [], self._every_s)[:2]):
            self._watch()

    def send_inline(self, kind: int, data: bytes | memoryview, a: int = 0) -> None:
        """A frame followed by `data`."""
        self.send(kind, a, c=len(data), data=data)

    def send_many(self, frames: Iterable[tuple[int, int, int, int]]) -> None:
        self._sendall(b"".join(FRAME.pack(*frame) for frame in frames))

    def recv(self) -> tuple[int, int, int, int]:
        """The next frame's kind and fields; ConnectionError when the peer has gone."""
        kind, a, b, c = FRAME.unpack(self.recv_bytes(FRAME.size))
        return kind, a, b, c

    def recv_bytes(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if self._watch is not None:
                self._wait(writing=False)
            data = self.sock.recv(max(1 << 16, size - len(self._buffer)))
            if not data:
                raise ConnectionError("the push link closed")
            self._buffer += data
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    @property
    def buffered(self) -> bool:
        return bool(self._buffer)

    def ready(self, timeout_s: float = 0.0) -> bool:
        """Whether a frame (or the peer's close) is waiting to be read, or comes within
        `timeout_s`."""
        return self.buffered or bool(select.select([self.sock], [], [], timeout_s)[0])

    def peer_closed(self) -> bool:
        """Whether nothing is left to read and the peer has closed its end (without waiting)."""
        if self._buffer:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()
