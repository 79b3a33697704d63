"""The sync relay's heartbeat to the inference service's process, over a Unix socket of its own.

A push link's service end is the thread applying the push, busy for as long as a part takes to
apply or a commit to check, so it answers nothing meanwhile; and the kernel's word on the
process (relay/frames.py's ServiceWatch) tells only a stopped one (SIGSTOP) apart. A process
frozen by its cgroup (`docker pause`), or stuck in the kernel or a driver (a hung GPU call,
paging itself to death), looks asleep, as a busy one may. So the service answers heartbeats on
a thread of its own that shares nothing with the pushes (`PulseAnswerer`): a byte in, the byte
back. The relay (`Pulse`) sends one while it waits on the service and judges by how long the
oldest unanswered one has waited. A service that runs, however slowly, answers in
milliseconds.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

logger = logging.getLogger(__name__)

BEAT = b"."


class PulseAnswerer:
    """The service's end: echoes each heartbeat the relay sends, one thread per connection
    (a relay has one; a relay started again, another)."""

    def __init__(self, path: str) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="relay-pulse", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed by close()
                return
            threading.Thread(
                target=self._answer, args=(sock,), name="relay-pulse", daemon=True
            ).start()

    @staticmethod
    def _answer(sock: socket.socket) -> None:
        with sock:
            try:
                while beats := sock.recv(64):
                    sock.sendall(beats)
            except OSError:  # the relay went away
                return

    def close(self) -> None:
        self._listener.close()


class Pulse:
    """The relay's end: `waited_s()` says how long the oldest heartbeat not yet answered has
    waited, sending one when none waits. Shared by every push link of the relay."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._sent_at: float | None = None  # when the beat waiting for its answer was sent
        self._lock = threading.Lock()

    def waited_s(self) -> float:
        """Seconds the oldest unanswered heartbeat has waited (0.0 when none did: one is sent
        now). ConnectionError when the service's end is gone."""
        with self._lock:
            sock = self._connected()
            try:
                while True:
                    answers = sock.recv(64, socket.MSG_DONTWAIT)
                    if not answers:
                        raise ConnectionError("the service closed its heartbeat socket")
                    self._sent_at = None  # one beat waits at a time: this answers it
            except BlockingIOError:
                pass
            except ConnectionError:
                self._drop()
                raise
            now = time.monotonic()
            if self._sent_at is None:
                try:
                    sock.send(BEAT, socket.MSG_DONTWAIT)
                except OSError as exc:
                    self._drop()
                    raise ConnectionError(f"the heartbeat socket broke: {exc}") from exc
                self._sent_at = now
                return 0.0
            return now - self._sent_at

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._path)
            except OSError as exc:
                sock.close()
                raise ConnectionError(f"cannot reach the service's heartbeat: {exc}") from exc
            self._sock = sock
            self._sent_at = None
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._sent_at = None

    def close(self) -> None:
        with self._lock:
            self._drop()
