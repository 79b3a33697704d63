"""The push link between the sync relay process and the inference service, and its relay end.

The relay (relay/process.py) receives a push's gRPC stream in a process of its own, decodes its
messages into push parts (syncplane/messages.py) and hands the parts on over a Unix socket, one
link per concurrent push; the service end (service_end.py) yields the same parts to the push
handler, which answers with the push's outcome or its status (frames.py has the frames).
Nothing is encoded again for the link or parsed again at the service: the header and commit
travel as their fields, and payload bytes through a ring of shared-memory slots (a memfd both
processes map), the socket saying only which slot holds how many. Consecutive data parts are
joined into one slot (four 1 MiB chunks): the service then wakes, takes its GIL and runs its
per-part Python a quarter as often (each of those wake-ups is felt by the requests it serves
meanwhile). The service frees a slot when it asks for the next part.

BEGIN opens a push as soon as the relay takes its call, so the service's idle timeout covers a
sender that never sends even a header. An answer may come before the stream ends (the push was
refused part-way, or ended for a stall or a fenced writer); the relay then stops relaying and
sends ABORT, and the service reads and drops frames up to the push's end, so the link is clean
for the next push.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable

from inference_service.syncplane.parts import Commit, Part, PushHeader, SenderGone
from inference_service.syncplane.relay.frames import (
    ABORT,
    BAD,
    BEGIN,
    COMMIT,
    DATA,
    EMPTY,
    END,
    FRAME,
    FREE,
    HEADER,
    HELLO,
    RESULT,
    SLOT,
    Answer,
    Frames,
    decode_answer,
    encode_header,
)
from shared.errors import MalformedPushError

SLOTS = 4
SLOT_BYTES = 4 << 20  # four 1 MiB data chunks, joined
POLL_EVERY = 8  # parts between the relay's looks for an early answer
STALL_S = 0.05  # and how long it waits for a part before it looks anyway


class _Buffer(ctypes.Structure):
    """CPython's Py_buffer (the stable ABI's), to find where a read-only view's bytes lie."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Buffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Buffer)]


def copy_to(address: int, data: bytes | memoryview) -> None:
    """Copy `data` to `address` with ctypes' memmove, which lets go of the GIL (gRPC's threads
    need it meanwhile). A view's bytes are found through the buffer protocol (ctypes takes only
    writable buffers as such); a data part is a read-only view of a gRPC message."""
    if isinstance(data, bytes):
        ctypes.memmove(address, data, len(data))
        return
    view = _Buffer()
    _get_buffer(data, ctypes.byref(view), 0)  # PyBUF_SIMPLE: contiguous bytes, or BufferError
    try:
        ctypes.memmove(address, view.buf, view.len)
    finally:
        _release_buffer(ctypes.byref(view))


class RelayLink:
    """The relay's end of one link: hands pushes to the service, one at a time."""

    def __init__(
        self,
        path: str,
        slots: int = SLOTS,
        slot_bytes: int = SLOT_BYTES,
        watch: Callable[[], None] | None = None,
        watch_every_s: float = 1.0,
    ) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        fd = os.memfd_create("weightsync-push-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            self._ring = mmap.mmap(fd, slots * slot_bytes)
            socket.send_fds(sock, [FRAME.pack(HELLO, slots, 0, slot_bytes)], [fd])
        finally:
            os.close(fd)
        self._frames = Frames(sock, watch, watch_every_s)
        self._slots = slots
        self._slot_bytes = slot_bytes
        self._pin = ctypes.c_char.from_buffer(self._ring)  # released by close()
        self._base = ctypes.addressof(self._pin)
        self.healthy = True

    def push(self, parts: Iterable[Part | None]) -> Answer:
        """Relay one push's parts and return the service's answer.

        A None among the parts says none has come for a while: the relay then looks for an
        early answer, so a sender that stalls after a refusal still gets it at once. `parts`
        raises SenderGone when the sender went away, MalformedPushError for a message that is
        no part: the service is told, and answers. ConnectionError when the service went away
        (ServiceStopped when the link's watch gave up on it); the link is then unusable, and
        closing it makes the service drop the push when it runs again (service_end.py)."""
        self.healthy = False  # until the exchange completes
        self._free: deque[int] = deque(range(self._slots))
        self._joining: int | None = None  # the slot that data parts are being joined in
        self._joined = 0
        answer: Answer | None = None
        self._frames.send(BEGIN)
        try:
            answer = self._relay(parts)
        except SenderGone:
            self._flush()
            self._frames.send(ABORT)
        except MalformedPushError as error:
            self._flush()
            self._frames.send_inline(BAD, str(error).encode())
        else:
            if answer is not None:  # refused part-way: the relay stops
                self._frames.send(ABORT)
                self.healthy = True
                return answer
            self._frames.send(END)
        while answer is None:
            answer = self._take_frames(wait=True)
        self.healthy = True
        return answer

    def _relay(self, parts: Iterable[Part | None]) -> Answer | None:
        for count, part in enumerate(parts):
            if (part is None or count % POLL_EVERY == 0) and (
                answer := self._take_frames(wait=False)
            ):
                return answer  # a refusal part-way is noticed this soon
            if part is None:
                # The sender paused: what it sent so far is applied (and counted in GetModel's
                # `pending`, the offset a push resuming it starts from), not held here.
                self._flush()
                continue
            if isinstance(part, bytes | memoryview):
                if len(part) > self._slot_bytes:
                    self._flush()
                    self._frames.send_inline(DATA, part)
                    continue
                if self._joining is not None and self._joined + len(part) > self._slot_bytes:
                    self._flush()
                if self._joining is None:
                    if (answer := self._take_slot()) is not None:
                        return answer
                    self._joining = self._free.popleft()
                copy_to(self._base + self._joining * self._slot_bytes + self._joined, part)
                self._joined += len(part)
                continue
            self._flush()  # other parts keep their place in the stream
            if isinstance(part, PushHeader):
                self._frames.send_inline(HEADER, encode_header(part))
            elif isinstance(part, Commit):
                self._frames.send_inline(COMMIT, part.digest)
            else:
                self._frames.send(EMPTY)
        self._flush()
        return None

    def _flush(self) -> None:
        """Hand the service the data parts joined so far, as one."""
        if self._joining is None:
            return
        self._frames.send(SLOT, self._joining, 0, self._joined)
        self._joining = None
        self._joined = 0

    def _take_slot(self) -> Answer | None:
        """Wait until a slot is free, unless the service answers first."""
        if not self._free:
            return self._take_frames(wait=True)
        return None

    def _take_frames(self, wait: bool) -> Answer | None:
        """Take FREE frames (all waiting ones; with `wait`, at least one frame) until a RESULT."""
        while wait or self._frames.ready():
            kind, a, _, c = self._frames.recv()
            if kind == FREE:
                self._free.append(a)
                wait = False
            elif kind == RESULT:
                return decode_answer(a, self._frames.recv_bytes(c))
            else:
                raise ConnectionError(f"unexpected frame {kind} on the push link")
        return None

    def close(self) -> None:
        self._frames.close()
        del self._pin
        self._ring.close()
