"""Prometheus metrics over HTTP, on an address of their own."""

from __future__ import annotations

import prometheus_client

# Seconds; covers a tiny model's push (ms) up to a multi-GiB one over a slow link.
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def serve_metrics(address: str) -> int:
    """Start the /metrics HTTP endpoint on HOST:PORT (port 0: any); return the bound port."""
    host, _, port = address.rpartition(":")
    try:
        server, _thread = prometheus_client.start_http_server(int(port), addr=host.strip("[]"))
    except OSError as exc:
        raise OSError(f"cannot listen on {address} for metrics: {exc.strerror or exc}") from None
    return int(server.server_port)
