"""The push link between the sync relay process and the inference service.

The relay (inference_service/syncplane/relay.py) receives a push's gRPC stream in a process of
its own and hands the messages on over a Unix socket, one link per concurrent push. The bulk
bytes go through a ring of shared-memory slots (a memfd both processes map); the socket carries
only small frames saying where in which slot the next message lies, plus the rare message too
large for a slot. Consecutive data messages are joined into one data message of up to a slot's
size: the service then wakes, takes its GIL and runs its per-message Python a quarter as often
(each of those wake-ups is felt by the requests it serves meanwhile). The service frees a slot
when it asks for the next message, and answers each push with one RESULT frame: the gRPC
status, and the PushResponse or the error's reason and message.

    relay -> service   HELLO (with the ring's fd); per push: BEGIN, SLOT | INLINE ... END | ABORT
    service -> relay   FREE ..., RESULT

BEGIN opens a push as soon as the relay takes its call, so the service's idle timeout covers a
sender that never sends even a header. A RESULT may come before the stream ends (the push was
refused part-way, or ended for a stall or a fenced writer); the relay then stops relaying and
sends ABORT, and the service reads and drops frames up to END or ABORT, so the link is clean for
the next push.
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

from shared.weights.wire import data_header, data_payload

FRAME = struct.Struct("<BIIQ")  # kind, a, b, c
HELLO, SLOT, INLINE, END, ABORT, FREE, RESULT, BEGIN = range(1, 9)
SLOTS = 4
SLOT_BYTES = (4 << 20) + 4096  # four 1 MiB data chunks, joined, and their framing
HEAD = 11  # room before a joined payload for its tag and the longest varint length
POLL_EVERY = 8  # messages between the relay's looks for an early answer
STALL_S = 0.05  # and how long it waits for a message before it looks anyway
FREE_BATCH = 2  # slots the service hands back in one write
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


def _address(data: bytes) -> int:
    """Where a bytes object's contents lie (ctypes takes only writable buffers as such)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class _Frames:
    """Frames over one connected Unix stream socket, read through a buffer (a few frames often
    arrive together, and each saved read is a system call saved per megabyte pushed)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def send(
        self, kind: int, a: int = 0, b: int = 0, c: int = 0, data: bytes | memoryview = b""
    ) -> None:
        self.sock.sendall(FRAME.pack(kind, a, b, c))
        if data:
            self.sock.sendall(data)

    def send_many(self, frames: Iterable[tuple[int, int, int, int]]) -> None:
        self.sock.sendall(b"".join(FRAME.pack(*frame) for frame in frames))

    def recv(self) -> tuple[int, int, int, int]:
        """The next frame's kind and fields; ConnectionError when the peer has gone."""
        kind, a, b, c = FRAME.unpack(self.recv_bytes(FRAME.size))
        return kind, a, b, c

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

    def ready(self, timeout_s: float = 0.0) -> bool:
        """Whether a frame (or the peer's close) is waiting to be read, or comes within
        `timeout_s`."""
        return self.buffered or bool(select.select([self.sock], [], [], timeout_s)[0])

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
            socket.send_fds(sock, [FRAME.pack(HELLO, slots, 0, slot_bytes)], [fd])
        finally:
            os.close(fd)
        self._frames = _Frames(sock)
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._pin = ctypes.c_char.from_buffer(self._ring)  # released by close()
        self._base = ctypes.addressof(self._pin)
        self.healthy = True

    def push(self, messages: Iterable[bytes | None]) -> Result:
        """Relay one push's messages and return the service's answer.

        A None among the messages says none has come for a while: the relay then looks for an
        early answer, so a sender that stalls after a refusal still gets it at once.
        ConnectionError when the service went away; the link is then unusable."""
        self.healthy = False  # until the exchange completes
        self._free: deque[int] = deque(range(self._slots))
        self._joining: int | None = None  # the slot that data payloads are being joined in
        self._joined = 0
        result: Result | None = None
        self._frames.send(BEGIN)
        try:
            result = self._relay(messages)
        except grpc.RpcError:  # the sender cancelled or went away: the service rejects the push
            self._frames.send(ABORT)
        else:
            if result is not None:  # refused part-way: the relay stops
                self._frames.send(ABORT)
                self.healthy = True
                return result
            self._frames.send(END)
        while result is None:
            result = self._take_frames(wait=True)
        self.healthy = True
        return result

    def _relay(self, messages: Iterable[bytes | None]) -> Result | None:
        room = self._slot_bytes - HEAD
        for count, message in enumerate(messages):
            if (message is None or count % POLL_EVERY == 0) and (
                result := self._take_frames(wait=False)
            ):
                return result  # a refusal part-way is noticed this soon
            if message is None:
                continue
            payload = data_payload(message)
            if payload is not None and len(payload) <= room:
                if self._joining is not None and self._joined + len(payload) > room:
                    self._flush()
                if self._joining is None:
                    if (result := self._take_slot()) is not None:
                        return result
                    self._joining = self._free.popleft()
                at = self._base + self._joining * self._slot_bytes + HEAD + self._joined
                skip = len(message) - len(payload)  # the message's tag and length
                # ctypes' memmove lets go of the GIL, which gRPC's threads need meanwhile
                ctypes.memmove(at, _address(bytes(message)) + skip, len(payload))
                self._joined += len(payload)
                continue
            self._flush()  # other messages keep their place in the stream
            if len(message) > self._slot_bytes:
                self._frames.send(INLINE, c=len(message), data=message)
                continue
            if (result := self._take_slot()) is not None:
                return result
            slot = self._free.popleft()
            ctypes.memmove(self._base + slot * self._slot_bytes, message, len(message))
            self._frames.send(SLOT, slot, 0, len(message))
        self._flush()
        return None

    def _flush(self) -> None:
        """Hand the service the data payloads joined so far, as one data message."""
        if self._joining is None:
            return
        head = data_header(self._joined)
        start = HEAD - len(head)
        ctypes.memmove(self._base + self._joining * self._slot_bytes + start, head, len(head))
        self._frames.send(SLOT, self._joining, start, len(head) + self._joined)
        self._joining = None
        self._joined = 0

    def _take_slot(self) -> Result | None:
        """Wait until a slot is free, unless the service answers first."""
        if not self._free:
            return self._take_frames(wait=True)
        return None

    def _take_frames(self, wait: bool) -> Result | None:
        """Take FREE frames (all waiting ones; with `wait`, at least one frame) until a RESULT."""
        while wait or self._frames.ready():
            kind, a, _, c = self._frames.recv()
            if kind == FREE:
                self._free.append(a)
                wait = False
            elif kind == RESULT:
                return Result.decode(a, self._frames.recv_bytes(c))
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
        kind, slots, _, slot_bytes = FRAME.unpack(message)
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
        first: tuple[int, int, int, int],
    ) -> None:
        self._frames = frames
        self._ring = ring
        self._slot_bytes = slot_bytes
        self._first: tuple[int, int, int, int] | None = first
        self._freed: list[int] = []
        self.ended = False

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return self

    def __next__(self) -> bytes | memoryview:
        while (message := self._next(None)) is None:
            pass
        return message

    def waiting(self, every_s: float) -> Iterator[bytes | memoryview | None]:
        """The messages, with a None each time `every_s` passes without one."""
        while True:
            try:
                yield self._next(every_s)
            except StopIteration:
                return

    def _next(self, timeout_s: float | None) -> bytes | memoryview | None:
        """The next message; None after `timeout_s` without one (or for a BEGIN)."""
        # Slots are handed back a few at a time, and always before waiting on the relay.
        if self._freed and (len(self._freed) >= FREE_BATCH or not self._frames.buffered):
            self._frames.send_many((FREE, slot, 0, 0) for slot in self._freed)
            self._freed.clear()
        if self.ended:
            raise StopIteration
        if self._first is None and timeout_s is not None and not self._frames.ready(timeout_s):
            return None
        kind, a, b, c = self._first or self._frames.recv()
        self._first = None
        if kind == BEGIN:
            return None
        if kind == SLOT:
            self._freed.append(a)
            start = a * self._slot_bytes + b
            return self._ring[start : start + c]
        if kind == INLINE:
            return self._frames.recv_bytes(c)
        self.ended = True
        if kind == END:
            raise StopIteration
        if kind == ABORT:
            raise RelayedCancel()
        raise ConnectionError(f"unexpected frame {kind} on the push link")

    def answer(self, result: Result) -> None:
        data = result.encode()
        self._frames.send(RESULT, result.code.value[0], c=len(data), data=data)

    def drain(self) -> None:
        """Drop what the relay sent after the answer, up to its END or ABORT."""
        while not self.ended:
            kind, _, _, c = self._frames.recv()
            if kind == INLINE:
                self._frames.recv_bytes(c)
            self.ended = kind in (END, ABORT)
