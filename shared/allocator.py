"""glibc malloc settings for processes that stream weights through grpcio.

grpcio hands every received message to Python as a new `bytes` object, so a 1 GiB push in 1 MiB
messages allocates and frees a megabyte a thousand times, on a gRPC thread's own malloc arena.
With glibc's default, self-adjusting thresholds that arena's heap is shrunk (madvise
DONTNEED) and grown back (mprotect) over and over, and every page it grows back faults and is
zeroed again: 30,000 to 260,000 page faults per GiB received on the development machine, which
made the receiving side of a push cost twice the CPU of raw grpcio and held the full sync at
0.6-0.8 of the raw stream's speed on two cores (bench/sync.py).

Fixed thresholds keep those buffers on heap memory that stays mapped: allocations up to
`MMAP_THRESHOLD` come from the heap, and a heap keeps up to `TRIM_THRESHOLD` of free memory at
its top instead of returning it at once. They are the values glibc's own scheme climbs to
after freeing large blocks (its ceiling for the mmap threshold, and twice that), so tensors of
up to 32 MiB that a model allocates and frees on every request stay on the heap as well. The
cost is up to that much idle memory per busy arena.

Anyone who tuned malloc already (the MALLOC_*_ environment variables, or glibc.malloc tunables)
keeps their settings; `WEIGHTSYNC_MALLOC=default` (resolved by main(), see shared/settings.py)
leaves glibc's defaults. Other C libraries, or an allocator such as jemalloc preloaded in its
place, are left alone too.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

MiB = 1 << 20
MMAP_THRESHOLD = 32 * MiB
TRIM_THRESHOLD = 64 * MiB

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_USER_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def _left_to_user(malloc: str, environ: Mapping[str, str]) -> str | None:
    """Why malloc is left as it is, or None to tune it."""
    if malloc == "default":
        return "WEIGHTSYNC_MALLOC=default"
    named = [name for name in _USER_SETTINGS if name in environ]
    if named:
        return f"{named[0]} is set"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    return None


def tune_for_streaming(
    malloc: str, environ: Mapping[str, str] | None = None
) -> dict[str, int] | None:
    """Set glibc's malloc thresholds for streamed messages, unless `malloc` (WEIGHTSYNC_MALLOC)
    is "default" or `environ` (glibc's own variables; os.environ by default) shows malloc
    already tuned; return what was set, or None."""
    environ = os.environ if environ is None else environ
    reason = _left_to_user(malloc, environ)
    if reason is not None:
        logger.debug("malloc left as it is: %s", reason)
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("malloc left as it is: not glibc")
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD
    )
    if not applied:
        logger.warning("glibc refused the malloc thresholds %s; streaming may page-fault", settings)
        return None
    logger.debug("malloc thresholds set for streamed messages: %s", settings)
    return settings
