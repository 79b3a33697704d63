"""Trainer side: stream a set of tensors as safetensors bytes, chunk by chunk.

The chunks are cut straight from tensor memory: each one is a single `bytes` join over views of
the tensors it spans, so the sender never builds the whole serialized blob (safetensors'
`save()` does, at about 0.4 GB/s on these machines, slower than the wire itself). A tensor
sent encoded (shared/weights/encoding.py) streams its encoded bytes instead; a name tied to a
carried tensor (shared/weights/ties.py) streams nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import xxhash

from shared.weights.digest import byte_view
from shared.weights.layout import TensorEntry, TensorLayout, build_header
from shared.weights.ties import ties

DEFAULT_CHUNK_BYTES = 1 << 20  # ~1 MiB messages stream fastest through grpcio (research notes)


@dataclass(frozen=True)
class Payload:
    """The safetensors framing of some named tensors, ready to stream."""

    header: bytes
    entries: list[TensorEntry]
    tensors: list[torch.Tensor | bytes]  # bytes: the tensor's encoded bytes
    tied: dict[str, str] = field(default_factory=dict)  # name -> the carried name it holds

    @classmethod
    def of(
        cls,
        tensors: Sequence[tuple[str, torch.Tensor]],
        metadata: Mapping[str, str] | None = None,
        encoded: Mapping[str, tuple[str, bytes]] | None = None,
        tied: Mapping[str, str] | None = None,
    ) -> Payload:
        """The payload of `tensors`; those named in `encoded` travel as (encoding, bytes), and
        the names in `tied` as the carried tensor they name."""
        encoded = encoded or {}
        header, entries = build_header(
            [(name, TensorLayout.of(t)) for name, t in tensors],
            metadata,
            {name: (encoding, len(data)) for name, (encoding, data) in encoded.items()},
            tied,
        )
        sources: list[torch.Tensor | bytes] = [
            encoded[name][1] if name in encoded else t for name, t in tensors
        ]
        return cls(header, entries, sources, dict(tied or {}))

    @classmethod
    def of_state(cls, state: Mapping[str, torch.Tensor]) -> Payload:
        """The payload of a whole state, each tensor once: a tied name travels as the first
        name of its tensor."""
        tied = ties(state)
        return cls.of([(n, t) for n, t in state.items() if n not in tied], tied=tied)

    @property
    def layouts(self) -> dict[str, TensorLayout]:
        """The layout of every name the payload gives a tensor, tied names included."""
        layouts = {entry.name: entry.layout for entry in self.entries}
        return {**layouts, **{name: layouts[source] for name, source in self.tied.items()}}

    @property
    def nbytes(self) -> int:
        return len(self.header) + (self.entries[-1].end if self.entries else 0)

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Yield the payload in chunks of `chunk_bytes` (the last one may be shorter)."""
        for pieces in self.pieces(chunk_bytes):
            yield b"".join(pieces)

    def pieces(
        self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, hashes: dict[str, bytes] | None = None
    ) -> Iterator[list[memoryview]]:
        """Yield each chunk as views of the memory it spans; nothing is copied here.

        With `hashes`, also hash the bytes of each tensor it lacks as they stream (while they
        are in cache) and store its xxh3_128 there once its last byte has been yielded (and
        under its tied names once the last chunk has).
        """
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        if hashes is not None and any(e.encoding and e.name not in hashes for e in self.entries):
            raise ValueError("an encoded tensor's hash is that of its decoded bytes")
        pieces: list[memoryview] = []
        size = 0
        for name, view in self._sources():
            hashing = hashes is not None and name is not None and name not in hashes
            hasher = xxhash.xxh3_128() if hashing else None
            position = 0
            while position < len(view):  # a chunk may end mid-tensor or span several tensors
                take = min(chunk_bytes - size, len(view) - position)
                piece = view[position : position + take]
                if hasher is not None:
                    hasher.update(piece)
                pieces.append(piece)
                size += take
                position += take
                if size == chunk_bytes:
                    yield pieces
                    pieces, size = [], 0
            if hasher is not None and hashes is not None and name is not None:
                hashes[name] = hasher.digest()
        if size:
            yield pieces
        if hashes is not None:
            for name, source in self.tied.items():
                hashes[name] = hashes[source]

    def _sources(self) -> Iterator[tuple[str | None, memoryview]]:
        yield None, memoryview(self.header)
        for entry, tensor in zip(self.entries, self.tensors, strict=True):
            if isinstance(tensor, bytes):
                yield entry.name, memoryview(tensor)
            else:
                yield entry.name, byte_view(tensor.detach().to("cpu").contiguous())
