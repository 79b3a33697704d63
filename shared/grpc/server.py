"""Build, start and stop a gRPC server: separate steps, and start returns the bound port."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from shared.grpc.auth import TlsFiles
from shared.grpc.options import server_options


def new_server(
    workers: int,
    max_message_bytes: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_concurrent_rpcs: int | None = None,
) -> grpc.Server:
    """A thread-pool server; calls beyond `max_concurrent_rpcs` get RESOURCE_EXHAUSTED."""
    return grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=server_options(max_message_bytes),
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


def bind(server: grpc.Server, address: str, tls: TlsFiles | None = None) -> int:
    """Listen on `address` (port 0: any free port) and return the port actually bound."""
    try:
        if tls is not None and tls.enabled:
            port = server.add_secure_port(address, tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return int(port)


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    """Write `info` as JSON atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
