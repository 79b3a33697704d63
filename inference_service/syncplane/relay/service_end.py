"""The service's end of the push link: each relayed push's parts, as they come, and its answer.

The parts are yielded to the push handler as the relay sent them (relay/link.py has the link):
data as views of the ring's slots, freed when the next part is asked for.
"""

from __future__ import annotations

import mmap
import os
import socket
from collections.abc import Iterator

from inference_service.syncplane.parts import Commit, Empty, Part, SenderGone
from inference_service.syncplane.relay.frames import (
    ABORT,
    BEGIN,
    COMMIT,
    DATA,
    EMPTY,
    END,
    ENDS,
    FRAME,
    FREE,
    HEADER,
    HELLO,
    INLINE,
    RESULT,
    SLOT,
    Answer,
    Frames,
    decode_header,
    encode_answer,
)
from shared.errors import MalformedPushError

FREE_BATCH = 2  # slots the service hands back in one write


class ServiceLink:
    """The service's end of one link: each push's parts, and its answer."""

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
        self._frames = Frames(sock)

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
    """A push's parts as they come off the link: data as views of ring slots, or bytes.

    A view stays valid until the next part is asked for; asking frees its slot. The stream
    raises SenderGone where the sender went away, MalformedPushError where the relay found a
    message that is no part."""

    def __init__(
        self, frames: Frames, ring: memoryview, slot_bytes: int, first: tuple[int, int, int, int]
    ) -> None:
        self._frames = frames
        self._ring = ring
        self._slot_bytes = slot_bytes
        self._first: tuple[int, int, int, int] | None = first
        self._freed: list[int] = []
        self.ended = False

    def __iter__(self) -> Iterator[Part]:
        return self

    def __next__(self) -> Part:
        while (part := self._next(None)) is None:
            pass
        return part

    def waiting(self, every_s: float) -> Iterator[Part | None]:
        """The parts, with a None each time `every_s` passes without one."""
        while True:
            try:
                yield self._next(every_s)
            except StopIteration:
                return

    def _next(self, timeout_s: float | None) -> Part | None:
        """The next part; None after `timeout_s` without one (or for a BEGIN)."""
        # Slots are handed back a few at a time, and always before waiting on the relay.
        if self._freed and (len(self._freed) >= FREE_BATCH or not self._frames.buffered):
            self._frames.send_many((FREE, slot, 0, 0) for slot in self._freed)
            self._freed.clear()
        if self.ended:
            raise StopIteration
        if self._first is None and timeout_s is not None and not self._frames.ready(timeout_s):
            return None
        kind, a, _, c = self._first or self._frames.recv()
        self._first = None
        if kind == SLOT:
            self._freed.append(a)
            start = a * self._slot_bytes
            return self._ring[start : start + c]
        if kind == BEGIN:
            return None
        if kind not in ENDS:
            return self._part(kind, c)
        self.ended = True
        if kind == END:
            if self._frames.peer_closed():
                # The relay gave up on this push (this process was stopped meanwhile: relay
                # /link.py) and closed the link; its sender has a failure, so nothing commits.
                raise SenderGone()
            raise StopIteration
        if kind == ABORT:
            raise SenderGone()
        raise MalformedPushError(self._frames.recv_bytes(c).decode(errors="replace"))

    def _part(self, kind: int, size: int) -> Part:
        if kind == DATA:
            return self._frames.recv_bytes(size)
        if kind == HEADER:
            return decode_header(self._frames.recv_bytes(size))
        if kind == COMMIT:
            return Commit(self._frames.recv_bytes(size))
        if kind == EMPTY:
            return Empty()
        raise ConnectionError(f"unexpected frame {kind} on the push link")

    def answer(self, answer: Answer) -> None:
        code, data = encode_answer(answer)
        self._frames.send_inline(RESULT, data, a=code)

    def drain(self) -> None:
        """Drop what the relay sent after the answer, up to the push's end."""
        while not self.ended:
            kind, _, _, c = self._frames.recv()
            if kind in INLINE:
                self._frames.recv_bytes(c)
            self.ended = kind in ENDS
