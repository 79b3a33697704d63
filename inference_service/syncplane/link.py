"""The push link between the sync relay process and the inference service.

The relay (inference_service/syncplane/relay.py) receives a push's gRPC stream in a process of
its own and hands the messages on over a Unix socket, one link per concurrent push. The bulk
bytes go through a ring of shared-memory slots (a memfd both processes map); the socket carries
only small frames saying which slot holds the next message, plus the rare message too large for
a slot. The service frees a slot when it asks for the next message, and answers each push with
one RESULT frame: the gRPC status, and the PushResponse or the error's reason and message.

    relay -> service   HELLO (with the ring's fd), then per push: SLOT | INLINE ... END | ABORT
    service -> relay   FREE ..., RESULT

A RESULT may come before the stream ends (the push was refused part-way); the relay then stops
relaying and sends ABORT, and the service reads and drops frames up to END or ABORT, so the link
is clean for the next push.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

FRAME = struct.Struct("<BIQ")  # kind, a, b
HELLO, SLOT, INLINE, END, ABORT, FREE, RESULT = range(1, 8)
SLOTS = 8
SLOT_BYTES = (1 << 20) + 4096  # a 1 MiB data chunk and its few bytes of protobuf framing
POLL_EVERY = 8  # messages between the relay's looks for an early answer
FREE_BATCH = 4  # slots the service hands back in one write
CODES = {code.value[0]: code for code in grpc.StatusCode}


class RelayedCancel(grpc.RpcError):  # type: ignore[misc]
    """The push's gRPC stream broke off at the relay (the sender cancelled or went away)."""


@dataclass(frozen=True)
class Result:
    code: grpc.StatusCode
    payload: bytes = b""  # the serialized PushResponse when OK
    reason: str = ""
    message: str = ""

    def encode(self) -> bytes:
        if self.code is grpc.StatusCode.OK:
            return self.payload
        return f"{self.reason}\0{self.message}".encode()

    @staticmethod
    def decode(code: int, data: bytes) -> Result:
        status = CODES.get(code, grpc.StatusCode.UNKNOWN)
        if status is grpc.StatusCode.OK:
            return Result(status, data)
        reason, _, message = data.decode(errors="replace").partition("\0")
        return Result(status, reason=reason, message=message)


class _Frames:
    """Frames over one connected Unix stream socket, read through a buffer (a few frames often
    arrive together, and each saved read is a system call saved per megabyte pushed)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def send(self, kind: int, a: int = 0, b: int = 0, data: bytes | memoryview = b"") -> None:
        self.sock.sendall(FRAME.pack(kind, a, b))
        if data:
            self.sock.sendall(data)

    def send_many(self, frames: Iterable[tuple[int, int, int]]) -> None:
        self.sock.sendall(b"".join(FRAME.pack(*frame) for frame in frames))

    def recv(self) -> tuple[int, int, int]:
        """The next frame's kind and fields; ConnectionError when the peer has gone."""
        kind, a, b = FRAME.unpack(self.recv_bytes(FRAME.size))
        return kind, a, b

    def recv_bytes(self, size: int) -> bytes:
        while len(self._buffer) < size:
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

    def ready(self) -> bool:
        """Whether a frame (or the peer's close) is waiting to be read."""
        return self.buffered or bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()


class RelayLink:
    """The relay's end of one link: hands pushes to the service, one at a time."""

    def __init__(self, path: str, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        fd = os.memfd_create("weightsync-push-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            self._ring = mmap.mmap(fd, slots * slot_bytes)
            socket.send_fds(sock, [FRAME.pack(HELLO, slots, slot_bytes)], [fd])
        finally:
            os.close(fd)
        self._frames = _Frames(sock)
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._pin = ctypes.c_char.from_buffer(self._ring)  # released by close()
        self._base = ctypes.addressof(self._pin)
        self.healthy = True

    def push(self, messages: Iterable[bytes]) -> Result:
        """Relay one push's messages and return the service's answer.

        ConnectionError when the service went away; the link is then unusable."""
        self.healthy = False  # until the exchange completes
        free: deque[int] = deque(range(self._slots))
        try:
            for count, message in enumerate(messages):
                result = None
                if count % POLL_EVERY == 0:  # a refusal part-way is noticed this soon
                    result = self._take_frames(free, wait=False)
                if result is None and len(message) <= self._slot_bytes and not free:
                    result = self._take_frames(free, wait=True)
                if result is not None:  # refused part-way: stop relaying
                    self._frames.send(ABORT)
                    self.healthy = True
                    return result
                if len(message) <= self._slot_bytes:
                    slot = free.popleft()
                    # ctypes' memmove lets go of the GIL, which gRPC's threads need meanwhile
                    ctypes.memmove(self._base + slot * self._slot_bytes, message, len(message))
                    self._frames.send(SLOT, slot, len(message))
                else:
                    self._frames.send(INLINE, 0, len(message), message)
        except grpc.RpcError:  # the sender cancelled or went away: the service rejects the push
            self._frames.send(ABORT)
        else:
            self._frames.send(END)
        result = None
        while result is None:
            result = self._take_frames(free, wait=True)
        self.healthy = True
        return result

    def _take_frames(self, free: deque[int], wait: bool) -> Result | None:
        """Take FREE frames (all waiting ones; with `wait`, at least one frame) until a RESULT."""
        while wait or self._frames.ready():
            kind, a, b = self._frames.recv()
            if kind == FREE:
                free.append(a)
                wait = False
            elif kind == RESULT:
                return Result.decode(a, self._frames.recv_bytes(b))
            else:
                raise ConnectionError(f"unexpected frame {kind} on the push link")
        return None

    def close(self) -> None:
        self._frames.close()
        del self._pin
        self._ring.close()


class ServiceLink:
    """The service's end of one link: each push's messages, and its answer."""

    def __init__(self, sock: socket.socket) -> None:
        message, fds, _, _ = socket.recv_fds(sock, FRAME.size, 1)
        if len(message) != FRAME.size or len(fds) != 1:
            sock.close()
            raise ConnectionError("a push link opened without its ring")
        kind, slots, slot_bytes = FRAME.unpack(message)
        try:
            if kind != HELLO:
                raise ConnectionError(f"a push link opened with frame {kind}, not HELLO")
            self._ring = mmap.mmap(fds[0], slots * slot_bytes)
        finally:
            os.close(fds[0])
        self._view = memoryview(self._ring)
        self._slot_bytes = slot_bytes
        self._frames = _Frames(sock)

    def pushes(self) -> Iterator[PushStream]:
        """One stream per push, until the relay closes the link."""
        while True:
            try:
                first = self._frames.recv()
            except ConnectionError:
                return
            stream = PushStream(self._frames, self._view, self._slot_bytes, first)
            yield stream
            stream.drain()

    def close(self) -> None:
        self._frames.close()


class PushStream:
    """A push's messages as they come off the link: views of ring slots, or bytes.

    A message stays valid until the next one is asked for; asking frees its slot."""

    def __init__(
        self,
        frames: _Frames,
        ring: memoryview,
        slot_bytes: int,
        first: tuple[int, int, int],
    ) -> None:
        self._frames = frames
        self._ring = ring
        self._slot_bytes = slot_bytes
        self._first: tuple[int, int, int] | None = first
        self._freed: list[int] = []
        self.ended = False

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return self

    def __next__(self) -> bytes | memoryview:
        # Slots are handed back a few at a time, and always before waiting on the relay.
        if self._freed and (len(self._freed) >= FREE_BATCH or not self._frames.buffered):
            self._frames.send_many((FREE, slot, 0) for slot in self._freed)
            self._freed.clear()
        if self.ended:
            raise StopIteration
        kind, a, b = self._first or self._frames.recv()
        self._first = None
        if kind == SLOT:
            self._freed.append(a)
            start = a * self._slot_bytes
            return self._ring[start : start + b]
        if kind == INLINE:
            return self._frames.recv_bytes(b)
        self.ended = True
        if kind == END:
            raise StopIteration
        if kind == ABORT:
            raise RelayedCancel()
        raise ConnectionError(f"unexpected frame {kind} on the push link")

    def answer(self, result: Result) -> None:
        data = result.encode()
        self._frames.send(RESULT, result.code.value[0], len(data), data)

    def drain(self) -> None:
        """Drop what the relay sent after the answer, up to its END or ABORT."""
        while not self.ended:
            kind, _, b = self._frames.recv()
            if kind == INLINE:
                self._frames.recv_bytes(b)
            self.ended = kind in (END, ABORT)
