"""The threads that work on tensor bytes beside the caller: hashing a whole state, decoding a
push's encoded tensors. xxhash and the numpy calls they run let go of the GIL, so these take
the host's spare cores while the caller (the trainer's sync, a gRPC thread receiving a push)
goes on. One pool per process, made on first use."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

THREADS = min(os.cpu_count() or 1, 8)
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The process's pool of THREADS threads for byte work. Its tasks never wait on one
    another, so no task may submit to it and wait."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="bytes")
        return _pool
