"""A raw HTTP/2 client speaking gRPC's framing by hand, as a hostile client would: headers of
its choosing (sent as plain literals), gRPC frames whose flags and length prefixes it sets, and
the calls' statuses read back from the server's trailers."""

from __future__ import annotations

import socket
import threading
import zlib

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME = 16384
CANCEL = 0x8


def frame(kind: int, stream: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes(((value & 0x7F) | 0x80,))
        value >>= 7
    return out + bytes((value,))


def bytes_field(number: int, size: int) -> bytes:
    """The tag and length of protobuf bytes field `number` holding `size` bytes."""
    return varint(number << 3 | 2) + varint(size)


def grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    """gRPC's 5-byte prefix (compressed flag, big-endian length), then `message`."""
    return bytes((int(compressed),)) + len(message).to_bytes(4, "big") + message


def deflated_zeros(prefix: bytes, zeros: int, wbits: int) -> bytes:
    """`prefix` then `zeros` zero bytes, compressed (wbits 31: gzip, 15: zlib's deflate)
    without ever being held uncompressed."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [compressor.compress(prefix)]
    chunk = bytes(1 << 20)
    while zeros:
        n = min(zeros, len(chunk))
        out.append(compressor.compress(chunk[:n]))
        zeros -= n
    out.append(compressor.flush())
    return b"".join(out)


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    return bytes((first | limit,)) + varint(value - limit)


def hpack_literals(headers: list[tuple[str, str]]) -> bytes:
    """`headers` as HPACK literal fields without indexing, plain (not Huffman) strings."""
    out = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return out


def _read_int(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[i] & limit
    i += 1
    if value < limit:
        return value, i
    shift = 0
    while True:
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _read_str(block: bytes, i: int) -> tuple[str | None, int]:
    huffman = block[i] & 0x80
    size, i = _read_int(block, i, 7)
    return (None if huffman else block[i : i + size].decode("latin-1")), i + size


def literal_headers(block: bytes) -> dict[str, str]:
    """The fields of an HPACK `block` sent with a literal name and a plain value (gRPC sends a
    call's grpc-status and grpc-message so on a connection's first call); others are skipped."""
    found: dict[str, str] = {}
    i = 0
    while i < len(block):
        byte = block[i]
        if byte & 0x80:  # indexed field
            _, i = _read_int(block, i, 7)
            continue
        if byte & 0xE0 == 0x20:  # dynamic table size update
            _, i = _read_int(block, i, 5)
            continue
        index, i = _read_int(block, i, 6 if byte & 0x40 else 4)
        name: str | None = None
        if index == 0:
            name, i = _read_str(block, i)
        value, i = _read_str(block, i)
        if name is not None and value is not None:
            found[name] = value
    return found


class Connection:
    """One HTTP/2 connection; a thread reads what the server sends. It grants the server a
    large connection window but only HTTP/2's default 65,535 bytes per stream."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self._lock = threading.Condition()
        self._send_window = 65535
        self._initial_window = 65535
        self._windows: dict[int, int] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.goaway: bytes | None = None
        self.closed = False
        self._next_stream = 1
        self.sock.sendall(
            PREFACE + frame(SETTINGS) + frame(WINDOW_UPDATE, 0, (1 << 30).to_bytes(4, "big"))
        )
        threading.Thread(target=self._read, daemon=True).start()

    def open(self, path: str, *extra: tuple[str, str], end: bool = False) -> int:
        """Open a call to `path` (HEADERS, with `extra` fields); its stream id."""
        with self._lock:
            stream = self._next_stream
            self._next_stream += 2
            self._windows[stream] = self._initial_window
            block = hpack_literals(
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", "localhost"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    *extra,
                ]
            )
            flags = END_HEADERS | (END_STREAM if end else 0)
            self.sock.sendall(frame(HEADERS, stream, block, flags))
        return stream

    def send(self, stream: int, data: bytes, end: bool = False, piece: int = MAX_FRAME) -> int:
        """Send `data` on `stream` in DATA frames of at most `piece` bytes as flow control lets
        it; how many bytes went (fewer once the call ended or the connection closed)."""
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            with self._lock:
                self._lock.wait_for(lambda: self._stopped(stream) or self._window(stream) > 0)
                if self._stopped(stream):
                    return sent
                n = min(piece, len(view) - sent, self._window(stream))
                self._send_window -= n
                self._windows[stream] -= n
                last = end and sent + n == len(view)
                chunk = bytes(view[sent : sent + n])
                self.sock.sendall(frame(DATA, stream, chunk, END_STREAM if last else 0))
            sent += n
        return sent

    def cancel(self, stream: int) -> None:
        with self._lock:
            self.sock.sendall(frame(RST_STREAM, stream, CANCEL.to_bytes(4, "big")))

    def status(self, stream: int, timeout: float = 30.0) -> tuple[str | None, str | None]:
        """The call's grpc-status and grpc-message once its trailers came (None, None if the
        stream was reset or the connection closed first)."""
        with self._lock:
            self._lock.wait_for(
                lambda: "grpc-status" in self.headers.get(stream, {}) or self._stopped(stream),
                timeout,
            )
            fields = self.headers.get(stream, {})
            return fields.get("grpc-status"), fields.get("grpc-message")

    def close(self) -> None:
        self.sock.close()

    def _window(self, stream: int) -> int:
        return min(self._send_window, self._windows[stream])

    def _stopped(self, stream: int) -> bool:
        return self.closed or stream in self.ended or stream in self.reset

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                    data = self.sock.recv(1 << 16)
                    if not data:
                        raise OSError("closed")
                    buffer += data
                size = int.from_bytes(buffer[:3], "big")
                kind, flags = buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9 : 9 + size], buffer[9 + size :]
                with self._lock:
                    self._take(kind, flags, stream, payload)
                    self._lock.notify_all()
        except OSError:
            pass
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def _take(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for at in range(0, len(payload), 6):
                ident = int.from_bytes(payload[at : at + 2], "big")
                if ident == INITIAL_WINDOW_SIZE:
                    value = int.from_bytes(payload[at + 2 : at + 6], "big")
                    for open_stream in self._windows:
                        self._windows[open_stream] += value - self._initial_window
                    self._initial_window = value
            self.sock.sendall(frame(SETTINGS, 0, b"", ACK))
        elif kind == PING and not flags & ACK:
            self.sock.sendall(frame(PING, 0, payload, ACK))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream == 0:
                self._send_window += increment
            elif stream in self._windows:
                self._windows[stream] += increment
        elif kind == HEADERS:
            self.headers.setdefault(stream, {}).update(literal_headers(payload))
            if flags & END_STREAM:
                self.ended.add(stream)
        elif kind == DATA and flags & END_STREAM:
            self.ended.add(stream)
        elif kind == RST_STREAM:
            self.reset[stream] = int.from_bytes(payload, "big")
        elif kind == GOAWAY:
            self.goaway = payload
