"""The inference service's settings: flags, each also an environment variable."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_service.dataplane.admission import RequestLimits
from shared.cli import LOG_LEVELS, Option, boolean, host_port, optional_host_port, parse

DESCRIPTION = (
    "Serve the inference copies of the models an app defines over the Open Inference Protocol "
    "(gRPC), and take weight pushes from trainers on a separate sync address."
)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not a positive integer")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{value} is not a non-negative number")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not 0 < number < float("inf"):
        raise ValueError(f"{value} is not a positive number")
    return number


def _nice(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 19:
        raise ValueError(f"{value} is not between 0 and 19")
    return number


_LIMITS = RequestLimits()

OPTIONS = [
    Option(
        "--models",
        "INFERENCE_MODELS",
        "import string of the app: package.module:attribute",
        required=True,
    ),
    Option(
        "--listen",
        "INFERENCE_LISTEN",
        "data plane (OIP gRPC) listen address HOST:PORT",
        "127.0.0.1:8001",
        host_port,
    ),
    Option(
        "--sync-listen",
        "INFERENCE_SYNC_LISTEN",
        "sync plane (weight pushes) listen address HOST:PORT",
        "127.0.0.1:8101",
        host_port,
    ),
    Option(
        "--metrics-listen",
        "INFERENCE_METRICS_LISTEN",
        "Prometheus /metrics listen address HOST:PORT, or 'off'",
        "127.0.0.1:9101",
        optional_host_port,
    ),
    Option(
        "--sync-token",
        "INFERENCE_SYNC_TOKEN",
        "bearer token trainers must present on the sync plane (prefer the env var)",
    ),
    Option(
        "--data-token",
        "INFERENCE_DATA_TOKEN",
        "bearer token clients must present on the data plane (default: open)",
    ),
    Option(
        "--tls-cert",
        "INFERENCE_TLS_CERT",
        "PEM certificate: serve both planes over TLS",
        None,
        Path,
    ),
    Option("--tls-key", "INFERENCE_TLS_KEY", "PEM private key of --tls-cert", None, Path),
    Option(
        "--tls-client-ca",
        "INFERENCE_TLS_CLIENT_CA",
        "PEM CA: require client certificates it signed (mutual TLS) on both planes; it does "
        "not count as the sync plane's authentication, since every data-plane client holds one",
        None,
        Path,
    ),
    Option(
        "--tls-sync-client-ca",
        "INFERENCE_TLS_SYNC_CLIENT_CA",
        "PEM CA for the sync plane alone: require sync-plane clients to present certificates it "
        "signed instead of --tls-client-ca's; this authenticates the sync plane without a token",
        None,
        Path,
    ),
    Option(
        "--allow-open-sync",
        "INFERENCE_ALLOW_OPEN_SYNC",
        "start even though the sync plane listens beyond loopback with no token or client CA",
        False,
        boolean,
        switch=True,
    ),
    Option("--device", "INFERENCE_DEVICE", "auto (CUDA when present), cpu, cuda or cuda:N", "auto"),
    Option(
        "--state-dir",
        "INFERENCE_STATE_DIR",
        "directory that keeps the last committed weights of each model across restarts; "
        "'{slot}' in it takes the lowest-numbered directory no other replica holds",
        None,
        Path,
    ),
    Option(
        "--history",
        "INFERENCE_HISTORY",
        "committed versions of each model kept in --state-dir, to list and roll back to",
        5,
        _positive_int,
    ),
    Option(
        "--max-push-bytes",
        "INFERENCE_MAX_PUSH_BYTES",
        "largest push payload accepted, in bytes",
        64 << 30,
        _positive_int,
    ),
    Option(
        "--max-header-bytes",
        "INFERENCE_MAX_HEADER_BYTES",
        "largest safetensors header accepted in a push, in bytes",
        16 << 20,
        _positive_int,
    ),
    Option(
        "--max-concurrent-pushes",
        "INFERENCE_MAX_CONCURRENT_PUSHES",
        "sync-plane calls handled at once; more get RESOURCE_EXHAUSTED",
        8,
        _positive_int,
    ),
    Option(
        "--max-batch-size",
        "INFERENCE_MAX_BATCH_SIZE",
        "rows per dynamic batch for models whose tensors lead with -1 (1: no batching)",
        32,
        _positive_int,
    ),
    Option(
        "--max-queue-delay-ms",
        "INFERENCE_MAX_QUEUE_DELAY_MS",
        "longest a request waits for others to batch with, which it does only after a batch of "
        "several requests (0: batch only what is already queued)",
        0.5,
        float,
    ),
    Option(
        "--max-queue",
        "INFERENCE_MAX_QUEUE",
        "requests queued per model; more get UNAVAILABLE",
        1024,
        _positive_int,
    ),
    Option(
        "--max-requests-in-flight",
        "INFERENCE_MAX_REQUESTS_IN_FLIGHT",
        "inference requests per model admitted and not yet run (queued for a batch or a "
        "worker, or running); more get RESOURCE_EXHAUSTED",
        _LIMITS.max_requests_per_model,
        _positive_int,
    ),
    Option(
        "--max-request-bytes-in-flight",
        "INFERENCE_MAX_REQUEST_BYTES_IN_FLIGHT",
        "bytes of request tensors that all inference requests in flight may hold together; "
        "more get RESOURCE_EXHAUSTED",
        _LIMITS.max_bytes,
        _positive_int,
    ),
    Option(
        "--workers",
        "INFERENCE_WORKERS",
        "threads running models that are not batched (the data plane itself is one event loop)",
        8,
        _positive_int,
    ),
    Option(
        "--sync-max-mb-per-s",
        "INFERENCE_SYNC_MAX_MB_PER_S",
        "receive weight pushes no faster than this many MB/s, to keep their CPU cost out of "
        "serving latency (0: no limit)",
        0.0,
        _non_negative_float,
    ),
    Option(
        "--push-idle-timeout-s",
        "INFERENCE_PUSH_IDLE_TIMEOUT_S",
        "seconds a weight push may send nothing before it is ended with DEADLINE_EXCEEDED, "
        "freeing the model for other pushes",
        5.0,
        _positive_float,
    ),
    Option(
        "--sync-nice",
        "INFERENCE_SYNC_NICE",
        "how much lower (nice, 0-19) the CPU priority of the threads receiving weight pushes is "
        "than that of serving",
        10,
        _nice,
    ),
    Option(
        "--sync-relay",
        "INFERENCE_SYNC_RELAY",
        "receive pushes in a process of their own, which keeps their cost out of serving "
        "latency but copies each byte once more (auto: where this process may use 4 or more "
        "CPUs)",
        "auto",
        str.lower,
        choices=("auto", "on", "off"),
    ),
    Option(
        "--torch-threads",
        "INFERENCE_TORCH_THREADS",
        "torch intra-op threads (0: OMP_NUM_THREADS where set, else one per CPU the process may "
        "use, container quota included)",
        0,
        _non_negative_int,
    ),
    Option(
        "--grace",
        "INFERENCE_GRACE",
        "seconds in-flight requests get to finish on SIGTERM",
        10.0,
        float,
    ),
    Option(
        "--ready-file",
        "INFERENCE_READY_FILE",
        "write the bound ports here as JSON once serving (for tests and orchestration)",
        None,
        Path,
    ),
    Option(
        "--log-level", "INFERENCE_LOG_LEVEL", "logging level", "INFO", str.upper, choices=LOG_LEVELS
    ),
]


@dataclass(frozen=True)
class InferenceSettings:
    models: str
    listen: str = "127.0.0.1:8001"
    sync_listen: str = "127.0.0.1:8101"
    metrics_listen: str | None = "127.0.0.1:9101"
    sync_token: str | None = None
    data_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_sync_client_ca: Path | None = None
    allow_open_sync: bool = False
    device: str = "auto"
    state_dir: Path | None = None
    history: int = 5
    max_push_bytes: int = 64 << 30
    max_header_bytes: int = 16 << 20
    max_concurrent_pushes: int = 8
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.5
    max_queue: int = 1024
    max_requests_in_flight: int = _LIMITS.max_requests_per_model
    max_request_bytes_in_flight: int = _LIMITS.max_bytes
    workers: int = 8
    sync_max_mb_per_s: float = 0.0
    push_idle_timeout_s: float = 5.0
    sync_nice: int = 10
    sync_relay: str = "auto"
    torch_threads: int = 0
    grace: float = 10.0
    ready_file: Path | None = None
    log_level: str = "INFO"

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> InferenceSettings:
        values: dict[str, Any] = parse(
            "inference-service",
            DESCRIPTION,
            OPTIONS,
            argv,
            os.environ if environ is None else environ,
        )
        return cls(**values)
