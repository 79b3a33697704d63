"""Prometheus metrics over HTTP, on an address of their own.

prometheus_client's own server starts a thread for every connection and waits on it for as long
as the client likes: anyone who can reach the port (it has no authentication) could hold a
thread of the serving process per idle connection. Here the library's WSGI app is served by a
server that runs at most MAX_CONNECTIONS connections at once (one beyond is closed at once),
drops one that sends nothing for IDLE_TIMEOUT_S, and ends every connection CONNECTION_DEADLINE_S
after it was taken, however it trickles (one byte every few seconds would hold a slot for good).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client

# Seconds; covers a tiny model's push (ms) up to a multi-GiB one over a slow link.
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_CONNECTIONS = 16  # scrapers at once; a scrape takes milliseconds
IDLE_TIMEOUT_S = 10.0  # a connection that sends nothing this long is dropped
CONNECTION_DEADLINE_S = 10.0  # a connection is ended this long after it was taken, whatever it does


def serve_metrics(address: str) -> int:
    """Start the /metrics HTTP endpoint on HOST:PORT (port 0: any); return the bound port."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(
            host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
        server: WSGIServer = make_server(
            host, int(port), prometheus_client.make_wsgi_app(), server_class, _Quiet
        )
    except OSError as exc:
        raise OSError(f"cannot listen on {address} for metrics: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64  # a burst of connections is taken at once, not after SYN retries

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # at its limit: closed, holding nothing
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(CONNECTION_DEADLINE_S, _end, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()


def _end(connection: socket.socket) -> None:
    """End a connection past its deadline: the handler's read or write returns at once."""
    with contextlib.suppress(OSError):  # closed meanwhile
        connection.shutdown(socket.SHUT_RDWR)


class _Quiet(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # the connection's socket timeout

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""
