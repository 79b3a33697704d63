"""Inference side: parse a safetensors stream as it arrives and route tensor bytes to a sink.

The reader never buffers the payload: it reads the 8-byte length and the JSON header, checks the
header against the model's tensors, then hands each slice of tensor bytes to the sink (which
writes them into the staging copy) while hashing them for the digest check. An encoded tensor
(shared/weights/encoding.py) is gathered whole (it is shorter than the tensor) and handed to
the `decoder`, which decodes it against the base into the sink and hashes the result; where the
sink holds the tensor on the host that runs beside the stream (the next tensors are received,
and decoded, meanwhile), and `finish()` waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import xxhash

from shared.errors import MalformedPushError, ResourceLimitError
from shared.weights.layout import MAX_HEADER_BYTES, TensorEntry, TensorLayout, parse_header


class Decoder(Protocol):
    def __call__(self, entry: TensorEntry, data: bytes) -> Callable[[], bytes]:
        """Decode an encoded tensor's bytes into the sink, now or beside the stream; returns
        what gives the xxh3_128 of the decoded tensor once it is written (waiting for it).
        MalformedPushError, from either, if they do not decode."""


class TensorSink(Protocol):
    """Where the bytes of received tensors go."""

    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        """Store `data` at byte `offset` of tensor `entry`."""


class PayloadReader:
    """Consumes one push's payload bytes in arrival order."""

    def __init__(
        self,
        payload_bytes: int,
        expected: Mapping[str, TensorLayout],
        sink: TensorSink,
        max_header_bytes: int = MAX_HEADER_BYTES,
        decoder: Decoder | None = None,
    ) -> None:
        if payload_bytes < 8:
            raise MalformedPushError(
                f"payload_bytes is {payload_bytes}; a safetensors payload has at least 8 bytes"
            )
        self._payload_bytes = payload_bytes
        self._expected = expected
        self._sink = sink
        self._max_header_bytes = max_header_bytes
        self._received = 0
        self._prefix = bytearray()  # the 8-byte length, then the JSON header
        self._header_bytes: int | None = None
        self._entries: list[TensorEntry] | None = None
        self._tied: dict[str, str] = {}
        self._data_start = 0
        self._index = 0  # entry that receives the next data byte
        self._hasher = xxhash.xxh3_128()
        self._hashes: dict[str, bytes] = {}
        self._decoder = decoder
        self._encoded = bytearray()  # the encoded tensor being gathered
        self._decoding: dict[str, Callable[[], bytes]] = {}  # name -> its hash, once decoded

    @property
    def received(self) -> int:
        return self._received

    @property
    def entries(self) -> list[TensorEntry] | None:
        """The tensors this payload carries, once its header has been read."""
        return self._entries

    @property
    def tied(self) -> dict[str, str]:
        """The names this payload declares tied (name -> the carried name it holds)."""
        return self._tied

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._received + len(view) > self._payload_bytes:
            raise MalformedPushError(
                f"the push carries more than the {self._payload_bytes} payload bytes "
                "its header announced"
            )
        self._received += len(view)
        if self._entries is None:
            view = self._read_prefix(view)
        if view:
            self._read_data(view)

    def finish(self) -> dict[str, bytes]:
        """Check that the payload is complete, and wait for its encoded tensors to be decoded;
        return the xxh3_128 of each tensor received, under each of its names (a tied name's is
        that of the tensor it holds)."""
        if self._received != self._payload_bytes or self._entries is None:
            raise MalformedPushError(
                f"the push ended after {self._received} of {self._payload_bytes} payload bytes"
            )
        for name, decoded in self._decoding.items():
            self._hashes[name] = decoded()
        for entry in self._entries[self._index :]:  # only empty tensors can remain
            self._hashes[entry.name] = xxhash.xxh3_128_digest(b"")
        for name, source in self._tied.items():
            self._hashes[name] = self._hashes[source]
        return self._hashes

    def _read_prefix(self, view: memoryview) -> memoryview:
        if self._header_bytes is None:
            take = min(8 - len(self._prefix), len(view))
            self._prefix += view[:take]
            view = view[take:]
            if len(self._prefix) < 8:
                return view
            size = int.from_bytes(self._prefix, "little")
            if size > self._max_header_bytes:
                raise ResourceLimitError(
                    f"safetensors header of {size} bytes exceeds the {self._max_header_bytes}"
                    "-byte limit"
                )
            if size > self._payload_bytes - 8:
                raise MalformedPushError(
                    f"safetensors header length {size} exceeds the {self._payload_bytes}-byte "
                    "payload"
                )
            self._header_bytes = size
            self._prefix.clear()
        take = min(self._header_bytes - len(self._prefix), len(view))
        self._prefix += view[:take]
        if len(self._prefix) == self._header_bytes:
            self._data_start = 8 + self._header_bytes
            header = parse_header(
                bytes(self._prefix), self._payload_bytes - self._data_start, self._expected
            )
            self._entries, self._tied = header.entries, header.tied
            self._prefix = bytearray()
        return view[take:]

    def _read_data(self, view: memoryview) -> None:
        assert self._entries is not None
        position = self._received - len(view) - self._data_start  # data offset of view[0]
        while view:
            entry = self._entries[self._index]
            if position >= entry.end:  # also skips empty tensors
                self._close_entry(entry)
                continue
            take = min(entry.end - position, len(view))
            piece = view[:take]
            if entry.encoding is not None:
                self._encoded += piece
            else:
                self._sink.write(entry, position - entry.begin, piece)
                self._hasher.update(piece)
            position += take
            view = view[take:]
            if position == entry.end:
                self._close_entry(entry)

    def _close_entry(self, entry: TensorEntry) -> None:
        if entry.encoding is not None:
            if self._decoder is None:
                raise MalformedPushError(
                    f"tensor {entry.name!r} is encoded ({entry.encoding}) but a full push has "
                    "no base to decode it against"
                )
            self._decoding[entry.name] = self._decoder(entry, bytes(self._encoded))
            self._encoded.clear()
        else:
            self._hashes[entry.name] = self._hasher.digest()
            self._hasher.reset()
        self._index += 1
