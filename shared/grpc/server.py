"""gRPC servers as both services build them (thread-pool and asyncio), bound by `bind`, which
returns the port; the ready file a started service writes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from shared.errors import ConfigurationError
from shared.grpc.auth import TlsFiles
from shared.grpc.decoding import StrictAioServer, StrictDecoding
from shared.grpc.limits import CallBudget, CallLimiter
from shared.grpc.options import BOUNDED_READ_AHEAD, server_options


def new_server(
    workers: int,
    max_message_bytes: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    *,
    budget: CallBudget | None = None,
    name: str = "grpc",
    nice: int = 0,
    frequent_pings: bool = False,
    max_answer_bytes: int | None = None,
) -> grpc.Server:
    """A thread-pool server of `workers` threads; requests that do not parse get
    INVALID_ARGUMENT (`shared.grpc.decoding`). With `budget`, the calls that `interceptors`
    (authentication) let through run within it, and those beyond it get RESOURCE_EXHAUSTED
    (`shared.grpc.limits`); `workers` must then be at least `budget.threads`.

    `nice` lowers the CPU priority of the threads running its handlers (Linux schedules
    threads one by one), so that work yields to the process's other servers when CPUs are
    short. `frequent_pings`, `max_answer_bytes`: see `server_options`."""
    limiter: list[grpc.ServerInterceptor] = []
    if budget is not None:
        if workers < budget.threads:
            raise ValueError(
                f"{workers} threads cannot run the {budget.threads} that {budget} needs"
            )
        limiter.append(CallLimiter(budget))
    return grpc.server(
        ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix=name,
            initializer=functools.partial(lower_thread_priority, nice) if nice else None,
        ),
        options=server_options(max_message_bytes, frequent_pings, max_answer_bytes),
        interceptors=[*interceptors, *limiter, StrictDecoding()],
    )


def new_aio_server(
    max_message_bytes: int, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> grpc.aio.Server:
    """A grpc.aio server, requests that do not parse getting INVALID_ARGUMENT; create it on
    the event loop that will run it."""
    return StrictAioServer(
        grpc.aio.server(
            options=[*server_options(max_message_bytes), *BOUNDED_READ_AHEAD],
            interceptors=interceptors,
        )
    )


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by `increment` (up to 19); a no-op where the
    platform has no per-thread priorities. Lowering needs no privilege; raising it back would."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + increment))
    except OSError:
        pass


def bind(
    server: grpc.Server | grpc.aio.Server,
    address: str,
    tls: TlsFiles | None = None,
    flag: str | None = None,
) -> int:
    """Listen on `address` (port 0: any free port) and return the port actually bound; an
    OSError that names `flag`, the option that gave the address, when it cannot."""
    where = f"{flag}: cannot listen on {address}" if flag else f"cannot listen on {address}"
    try:
        if tls is not None and tls.enabled:
            port = server.add_secure_port(address, tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"{where}: {exc}") from None
    if port == 0:
        raise OSError(f"{where} (in use, or not an address of this host)")
    return int(port)


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    """Write `info` as JSON atomically, so a reader never sees half a file; ConfigurationError
    naming the path when it cannot be written (a directory there, a file above it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot write the ready file {path}: {exc.strerror}") from None
