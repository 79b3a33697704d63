"""The memory a RemoteDataCollector collects into: `bytes` objects filled in place.

gRPC's Python API sends only `bytes` (grpcio copies each message into a slice of its own when it
sends it, and reads the object no more), and a `bytes` object copied out of anything else, a
`bytearray` given to a request serializer included, is one more copy of every byte. So each
batch's message is a `bytes` object from the start: allocated uninitialized (the C API's
`PyBytes_FromStringAndSize(NULL, size)`, which is how C code builds a `bytes` object in place),
its framing written once, and `collect()` copying each sample's tensors straight into their rows.
The collector hands such an object to gRPC only when every row is written, and fills it again only
once the trainer acknowledged it and nothing but its slab refers to it (`unshared`).

`copier(size)` is libc's memmove, called keeping the GIL for copies under RELEASE_GIL_BYTES:
numpy and torch release it for copies of a few KiB, and handing the GIL to the sending threads
at every sample costs more than such a copy. Larger ones release it (measured: at 64 KiB a
sample, the sending threads then run alongside the copy and its page faults, and the agent
spends about a fifth less CPU a sample; at 4 KiB either way costs the same).

A slab's memory is fresh when a burst of samples outruns the trainer (slabs are reused once
acknowledged, but the queue grows), and faulting its pages in one by one as rows are written
costs more than the copies: `prefault` faults them in at once when the slab is allocated.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable
from typing import cast

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytes.restype = ctypes.py_object
_address_of = ctypes.pythonapi.PyBytes_AsString
_address_of.argtypes = [ctypes.py_object]
_address_of.restype = ctypes.c_void_p

RELEASE_GIL_BYTES = 16 << 10
# Filling a `bytes` object again that someone still holds would change it under them: its
# reference count tells reliably only on CPython with the GIL (a free-threaded build defers some
# counts), so elsewhere a slab's message is never filled twice.
_COUNTS_TELL = (
    sys.implementation.name == "cpython" and getattr(sys, "_is_gil_enabled", lambda: True)()
)

Copier = Callable[[int, int, int], None]  # (destination, source, bytes), addresses as ints


def _memmove(library: ctypes.CDLL) -> Copier:
    function = library.memmove
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = None
    return cast(Copier, function)


_memmove_keeping_gil = _memmove(ctypes.PyDLL(None))  # a PyDLL's functions keep the GIL
_memmove_releasing_gil = _memmove(ctypes.CDLL(None))  # a CDLL's release it


def copier(size: int) -> Copier:
    """The memmove to copy `size` bytes with: keeping the GIL, or releasing it when large."""
    return _memmove_releasing_gil if size >= RELEASE_GIL_BYTES else _memmove_keeping_gil


_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14 and later: fault the pages in, writable, in one call
HUGE_PAGE = 2 << 20
_madvise: Callable[[int, int, int], int] | None = None
if sys.platform == "linux":
    _libc = ctypes.CDLL(None, use_errno=True)  # a CDLL's functions release the GIL
    _madvise = cast(Callable[[int, int, int], int], _libc.madvise)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int


def prefault(address: int, size: int) -> None:
    """Fault in the whole pages of `size` bytes at `address` at once, ahead of their first
    write. Measured on a VM: a fresh page written costs about four times a page written again
    (its fault, and the kernel zeroing it); faulted in by one call for them all, about a third
    less. Memory that spans two huge pages or more is asked to use them first (one fault per 2
    MiB, less again). Where the system offers neither (an older kernel refuses the call), the
    pages fault in as they are written, as they would anyway."""
    if _madvise is None:
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + size) // page * page
    if end <= start:
        return
    if size >= 2 * HUGE_PAGE:
        _madvise(start, end - start, _MADV_HUGEPAGE)
    _madvise(start, end - start, _MADV_POPULATE_WRITE)


class Filled:
    """A `bytes` object of `size` bytes to fill in place, and where its bytes are."""

    def __init__(self, size: int) -> None:
        self.data: bytes = _new_bytes(None, size)
        address = _address_of(self.data)
        assert address is not None
        self.address: int = address
        self.size = size
        prefault(address, size)
        # A writable buffer over the bytes, for views of them (torch.frombuffer): it keeps them
        # alive, so a view outlives whatever drops this object.
        self.buffer = (ctypes.c_char * size).from_address(address)
        self.buffer.owner = self.data  # type: ignore[attr-defined]
        self._own_references = sys.getrefcount(self.data)

    def write(self, offset: int, value: bytes) -> None:
        """Copy `value` (a message's framing, a sequence number: a few bytes) to `offset`,
        keeping the GIL (the collector writes under its lock: a thread given the GIL then would
        only wait for the lock)."""
        if offset < 0 or offset + len(value) > self.size:
            raise IndexError(f"{len(value)} bytes at {offset} do not fit in {self.size}")
        _memmove_keeping_gil(self.address + offset, _address_of(value), len(value))

    @property
    def unshared(self) -> bool:
        """Whether nothing but this object refers to the bytes (so they may be written again)."""
        return _COUNTS_TELL and sys.getrefcount(self.data) <= self._own_references
