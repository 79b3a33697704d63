"""Sinks that write received tensor bytes into the standby copy of a model.

On the CPU the bytes go straight into the standby tensors' memory (one copy). On CUDA they pass
through a small ring of reused pinned host buffers and are copied to the device on a side stream,
so a push never holds a second host copy of the model and the request path's stream is not
stalled; `finish()` waits for the copies before the swap. `copy()` brings a tensor the push did
not carry up to date from the live copy, on the same stream. A tensor that arrives encoded is
decoded against the live copy (the push's base) by a `BaseDecoder` (`decode`): on the CPU
straight into the standby tensor's memory and hashed there, on the byte workers
(shared/weights/workers.py) while the stream goes on, so that a push's tensors decode on every
core; on CUDA into a host buffer, written the same way as received bytes. `finish()` waits for
the decodes in flight too. A tensor the model keeps strided (transposed) is written through a
contiguous copy of it, copied in by `finish()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait

import numpy as np
import torch

from inference_service import metrics
from shared.dtypes import BY_SAFETENSORS
from shared.errors import MalformedPushError
from shared.weights import workers
from shared.weights.encoding import EncodingError, decode
from shared.weights.layout import TensorEntry

# Decoding into a tensor's bytes: `Decode(out)` writes them into `out` (flat uint8, the
# tensor's size) and returns their xxh3_128, or raises MalformedPushError.
Decode = Callable[[np.ndarray], bytes]
_PIECE = 1 << 20  # bytes decoded into a buffer are written a piece at a time


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("standby tensors must be contiguous")
    return tensor.detach().reshape(-1).view(torch.uint8)


class _Targets:
    """Each standby tensor's bytes as one flat uint8 tensor to write into, made when the push
    first writes it (a delta touches few of a model's tensors). A tensor the model keeps
    strided (a transposed parameter, `p.data = p.data.t()`) is written through a contiguous
    copy of it, in the order its elements travel (row-major, as the trainer sends them), which
    `write_back()` copies into it once something was written there (`mark`): the model keeps
    its own layout, and a copy nothing was written to never overwrites memory that another
    name of the same tensor (tied) was written through."""

    def __init__(self, targets: Mapping[str, torch.Tensor]) -> None:
        self._targets = targets
        self._flat: dict[str, torch.Tensor] = {}
        self._strided: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._written: set[str] = set()

    def flat(self, name: str) -> torch.Tensor:
        """The bytes of standby tensor `name` (KeyError: the model has no such tensor)."""
        found = self._flat.get(name)
        if found is None:
            tensor = self._targets[name].detach()
            if not tensor.is_contiguous():
                scratch = tensor.contiguous()
                self._strided[name] = (tensor, scratch)
                tensor = scratch
            found = self._flat[name] = _flat_bytes(tensor)
        return found

    def mark(self, name: str) -> None:
        """Note that bytes are written into `name` (before or after they are: a strided
        tensor's contiguous copy is made here if it was not yet)."""
        self.flat(name)
        if name in self._strided:
            self._written.add(name)

    def tie(self, name: str, source: str) -> None:
        """Give `name` the bytes written into `source` (a name tied to it that the push did
        not carry), unless the two are one memory here."""
        into, given = self.flat(name), self.flat(source)
        if into.data_ptr() != given.data_ptr():
            into.copy_(given, non_blocking=True)
            self.mark(name)

    def write_back(self) -> None:
        """Copy each strided tensor's contiguous copy that was written into it."""
        for name, (tensor, scratch) in self._strided.items():
            if name in self._written:
                tensor.copy_(scratch, non_blocking=True)
        self._written.clear()


class _FirstWrite:
    """Calls `on_first_write(name)` the first time it is called with each name."""

    def __init__(self, on_first_write: Callable[[str], None]) -> None:
        self._on_first_write = on_first_write
        self._touched: set[str] = set()

    def __call__(self, name: str) -> None:
        if name not in self._touched:
            self._touched.add(name)
            self._on_first_write(name)


class CpuSink:
    """Writes tensor bytes into CPU tensors in place."""

    def __init__(
        self, targets: Mapping[str, torch.Tensor], on_first_write: Callable[[str], None]
    ) -> None:
        self._targets = _Targets(targets)
        self._first_write = _FirstWrite(on_first_write)
        self._decoding: list[Future[bytes]] = []
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> np.ndarray:
        """The bytes of standby tensor `name` as a numpy array."""
        found = self._arrays.get(name)
        if found is None:
            found = self._arrays[name] = self._targets.flat(name).numpy()
        return found

    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        self._first_write(entry.name)
        self._targets.mark(entry.name)
        target = self._array(entry.name)
        if offset < 0 or offset + len(data) > len(target):
            raise ValueError(f"write of {len(data)} bytes at {offset} overruns {entry.name!r}")
        # One numpy copy, which lets go of the GIL so gRPC's threads keep receiving, and costs
        # a few microseconds a piece (a model of small tensors writes thousands of pieces a
        # push; a memmove from numpy's ctypes address took 15). torch's copy_ would split a
        # 1 MiB copy across its intra-op threads: no faster, and on a small host it took twice
        # the CPU from the threads receiving the stream (bench/sync.py).
        target[offset : offset + len(data)] = data

    def copy(self, name: str, source: torch.Tensor) -> None:
        self._targets.mark(name)
        self._targets.flat(name).copy_(_flat_bytes(source.detach().contiguous()))

    def tie(self, name: str, source: str) -> None:
        """Give `name` the bytes written into `source` (see _Targets.tie)."""
        self._first_write(name)
        self._targets.tie(name, source)

    def decode(self, entry: TensorEntry, work: Decode) -> Callable[[], bytes]:
        """Run `work` into the standby tensor's memory (no buffer of the tensor's size, no
        second copy) on the byte workers; what waits for the hash it returns."""
        self._first_write(entry.name)
        self._targets.mark(entry.name)
        future = workers.pool().submit(work, self._array(entry.name))
        self._decoding.append(future)
        return future.result

    def finish(self) -> None:
        """Wait for the decodes in flight (their errors are their callers'); strided tensors
        get their bytes."""
        wait(self._decoding)
        self._decoding.clear()
        self._targets.write_back()


class CudaSink:
    """Writes tensor bytes into CUDA tensors through a ring of pinned staging buffers."""

    def __init__(
        self,
        targets: Mapping[str, torch.Tensor],
        on_first_write: Callable[[str], None],
        staging_bytes: int = 4 << 20,
        ring: int = 4,
    ) -> None:
        device = next(iter(targets.values())).device if targets else torch.device("cuda")
        self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        # Kernels of requests that ran on these (then live) weights may still be queued on the
        # request path's stream; the copies into them start only after those.
        self._stream.wait_stream(torch.cuda.current_stream(device))
        self._targets = _Targets(targets)  # its copies of strided tensors: on the stream
        self._buffers = [
            torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(ring)
        ]
        self._arrays = [b.numpy() for b in self._buffers]
        self._events: list[torch.cuda.Event | None] = [None] * ring
        self._next = 0
        self._first_write = _FirstWrite(on_first_write)

    def write(self, entry: TensorEntry, offset: int, data: memoryview) -> None:
        self._first_write(entry.name)
        self._targets.mark(entry.name)
        size = len(self._arrays[0])
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            slot = self._next
            self._next = (slot + 1) % len(self._buffers)
            event = self._events[slot]
            if event is not None:
                event.synchronize()  # the copy that last used this buffer is done
            n = len(piece)
            self._arrays[slot][:n] = np.frombuffer(piece, np.uint8)
            at = offset + start
            with torch.cuda.stream(self._stream):
                self._targets.flat(entry.name)[at : at + n].copy_(
                    self._buffers[slot][:n], non_blocking=True
                )
                recorded = torch.cuda.Event()  # type: ignore[no-untyped-call]
                recorded.record(self._stream)
            self._events[slot] = recorded

    def copy(self, name: str, source: torch.Tensor) -> None:
        self._targets.mark(name)
        with torch.cuda.stream(self._stream):
            flat = self._targets.flat(name)
            flat.copy_(_flat_bytes(source.detach().contiguous()), non_blocking=True)

    def tie(self, name: str, source: str) -> None:
        """Give `name` the bytes written into `source`, after them on the same stream."""
        self._first_write(name)
        with torch.cuda.stream(self._stream):
            self._targets.tie(name, source)

    def decode(self, entry: TensorEntry, work: Decode) -> Callable[[], bytes]:
        """Run `work` into a host buffer, then write its bytes as received ones travel, now;
        what gives the hash it returned."""
        out = np.empty(entry.layout.nbytes, np.uint8)
        digest = work(out)
        view = out.data
        for start in range(0, len(view), _PIECE):
            self.write(entry, start, view[start : start + _PIECE])
        return lambda: digest

    def finish(self) -> None:
        with torch.cuda.stream(self._stream):
            self._targets.write_back()
        self._stream.synchronize()


def make_sink(
    targets: Mapping[str, torch.Tensor], on_first_write: Callable[[str], None]
) -> CpuSink | CudaSink:
    tensors = targets.values()
    if all(t.is_cpu for t in tensors):
        return CpuSink(targets, on_first_write)
    if all(t.is_cuda for t in tensors):
        return CudaSink(targets, on_first_write)
    devices = {t.device.type for t in tensors}
    raise ValueError(f"a model's tensors must live on one kind of device, not {sorted(devices)}")


class BaseDecoder:
    """Decodes a delta push's encoded tensors against the live copy, the version it is based on
    (a shared/weights/reader.Decoder), into the standby copy through `into` (a sink's
    `decode`). On CUDA the base is copied to the host first."""

    def __init__(
        self,
        model: str,
        live: Mapping[str, torch.Tensor],
        into: Callable[[TensorEntry, Decode], Callable[[], bytes]],
    ) -> None:
        self._model = model
        self._live = live
        self._into = into

    def __call__(self, entry: TensorEntry, data: bytes) -> Callable[[], bytes]:
        encoding = entry.encoding
        assert encoding is not None
        base = _flat_bytes(self._live[entry.name].detach().to("cpu").contiguous()).numpy()
        itemsize = BY_SAFETENSORS[entry.layout.dtype].itemsize

        def work(out: np.ndarray) -> bytes:
            started = time.perf_counter()
            try:
                digest = decode(encoding, data, base, itemsize, out)
            except EncodingError as exc:
                raise MalformedPushError(
                    f"tensor {entry.name!r}: its {encoding} bytes do not decode against the "
                    f"base: {exc}"
                ) from None
            metrics.DECODE_SECONDS.labels(self._model, encoding).inc(time.perf_counter() - started)
            return digest

        return self._into(entry, work)
