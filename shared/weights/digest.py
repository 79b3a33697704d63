"""The digest of a model's weights: a hash over each tensor, then over the table of them.

digest = xxh3_128 over, for each tensor in name order: name, dtype, shape and the xxh3_128 of its
little-endian bytes. Because the model digest is built from per-tensor hashes, a receiver of a
delta checks the whole resulting state while hashing only the bytes that arrived, and a sender
finds which tensors changed by comparing hashes. xxh3 runs near memory speed (about 7.6 GB/s on
these machines, against 1.35 GB/s for sha256), so the check costs little next to the wire. It
guards against corruption and bugs, not against an attacker: that is the transport's job (TLS,
tokens). A whole state is hashed on several threads (`tensor_hashes`: xxhash lets go of the GIL),
each tensor once however many names it has.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping

import torch
import xxhash

from shared.weights import workers
from shared.weights.layout import TensorLayout
from shared.weights.ties import ties

PARALLEL_BYTES = 16 << 20  # a smaller state is hashed on the caller's thread


def _plain(tensor: torch.Tensor) -> bool:
    """Whether a tensor's values are its memory as it lies: on the CPU, strided, contiguous,
    and not lazily negated or conjugated."""
    return (
        tensor.is_cpu
        and tensor.layout is torch.strided
        and tensor.is_contiguous()
        and not tensor.is_neg()
        and not tensor.is_conj()
    )


def _memory(tensor: torch.Tensor) -> ctypes.Array[ctypes.c_char]:
    """The bytes of a plain tensor (`_plain`), at its address: it must outlive them."""
    return (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat read view of a contiguous CPU tensor's bytes (no copy), which keeps the tensor
    alive. Made from the tensor's address (about 2 us a tensor; through numpy, 8 to 20: a model
    of thousands of small tensors is viewed twice a push, to hash and to send), so a tensor
    whose values are not its memory's as they lie (lazily negated or conjugated) is resolved
    into memory of its own first."""
    if not tensor.is_cpu or tensor.layout is not torch.strided or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    if not _plain(tensor):
        tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.nbytes:
        return memoryview(b"")
    memory = _memory(tensor)
    memory.tensor = tensor  # type: ignore[attr-defined]  # the view keeps its memory alive
    return memoryview(memory).cast("B")


_EMPTY = xxhash.xxh3_128_digest(b"")


def tensor_hash(tensor: torch.Tensor) -> bytes:
    """xxh3_128 of a tensor's bytes; moves it to the CPU first when needed."""
    if not _plain(tensor):
        tensor = tensor.detach().to("cpu").contiguous().resolve_conj().resolve_neg()
    return xxhash.xxh3_128_digest(_memory(tensor)) if tensor.nbytes else _EMPTY


def tensor_hashes(state: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
    """`tensor_hash` of every tensor of `state`, on the byte workers (workers.py) where the state
    is large; a tied name (shared/weights/ties.py) gets its tensor's hash without hashing it
    again."""
    tied = ties(state)
    own = [(name, t) for name, t in state.items() if name not in tied]
    if workers.THREADS > 1 and len(own) > 1 and sum(t.nbytes for _, t in own) >= PARALLEL_BYTES:
        computed = workers.pool().map(tensor_hash, [t for _, t in own])
        hashes = dict(zip([n for n, _ in own], computed, strict=True))
    else:
        hashes = {name: tensor_hash(t) for name, t in own}
    return {name: hashes[tied.get(name, name)] for name in state}


class DigestTable:
    """The digest of any state laid out as `layouts`: each name's entry in the table (name,
    dtype and shape) is made once, so a digest is one hash over those entries and the
    tensors' hashes (a model of thousands of tensors is digested on every push, on both
    sides)."""

    def __init__(self, layouts: Mapping[str, TensorLayout]) -> None:
        self._entries = [
            (name, f"{name}\0{layout.dtype}\0{','.join(map(str, layout.shape))}\0".encode())
            for name, layout in sorted(layouts.items())
        ]

    def digest(self, hashes: Mapping[str, bytes]) -> bytes:
        """The digest of a state whose tensors hash to `hashes`, one for each name laid out."""
        if len(hashes) != len(self._entries):
            raise ValueError(f"{len(hashes)} hashes for a layout of {len(self._entries)} tensors")
        parts = []
        for name, entry in self._entries:
            parts.append(entry)
            parts.append(hashes[name])
        return xxhash.xxh3_128_digest(b"".join(parts))


@functools.lru_cache(maxsize=16)
def _table(entries: tuple[tuple[str, TensorLayout], ...]) -> DigestTable:
    return DigestTable(dict(entries))


def digest_table(layouts: Mapping[str, TensorLayout]) -> DigestTable:
    """The digest table of `layouts`, made once for each of the last few layouts seen (a
    model's layout rarely changes; a sender digests it on every push)."""
    return _table(tuple(layouts.items()))


def state_table(state: Mapping[str, torch.Tensor]) -> DigestTable:
    """The digest table of `state`'s layouts, kept as `digest_table` keeps it, looked up by
    each tensor's torch dtype and shape (cheaper per tensor than its TensorLayout)."""
    return _state_table(tuple((name, t.dtype, t.shape) for name, t in state.items()))


@functools.lru_cache(maxsize=16)
def _state_table(signature: tuple[tuple[str, torch.dtype, torch.Size], ...]) -> DigestTable:
    return DigestTable({name: TensorLayout.of_torch(dt, shape) for name, dt, shape in signature})


def model_digest(table: Mapping[str, tuple[TensorLayout, bytes]]) -> bytes:
    """The digest of a whole model from each tensor's layout and hash."""
    layouts = {name: layout for name, (layout, _) in table.items()}
    return DigestTable(layouts).digest({name: digest for name, (_, digest) in table.items()})


def state_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """The digest of a state dict (convenience for tests and tools)."""
    hashes = tensor_hashes(state)
    return model_digest({k: (TensorLayout.of(v), hashes[k]) for k, v in state.items()})
