"""The inference service's settings: each option declared once (shared/settings.py).

A default that belongs to a part the option configures is that part's own (SyncLimits,
BatchingConfig, RequestLimits, the data plane's WORKERS, the store's HISTORY);
docs/configuration.md is generated from this file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference_service import recording_options as recording
from inference_service.dataplane.admission import RequestLimits
from inference_service.dataplane.batcher import BatchingConfig
from inference_service.dataplane.service import WORKERS
from inference_service.persistence import HISTORY
from inference_service.syncplane.forward import PeerAccess
from inference_service.syncplane.limits import SyncLimits
from shared.cli import (
    BOOLEAN,
    HOST_PORT,
    PATH,
    SIZE,
    TOKEN,
    Converter,
    choice,
    duration,
    integer,
    nbytes,
    scaled,
    show_size,
)
from shared.devices import MAX_TORCH_THREADS
from shared.settings import SYNC_ADDRESS, Scope, ServiceOptions, option, options, parse_service

PROG = Scope.INFERENCE.value
DESCRIPTION = (
    "Serve the inference copies of the models an app defines over the Open Inference Protocol "
    "(gRPC), and take weight pushes from trainers on a separate sync address."
)

COMMON = ServiceOptions("INFERENCE")


@dataclass(frozen=True)
class InferenceSettings:
    models: str = COMMON.models()
    listen: str = field(
        default="127.0.0.1:8001",
        metadata=option(
            "--listen", "INFERENCE_LISTEN", "data plane (OIP gRPC) listen address", HOST_PORT
        ),
    )
    sync_listen: str = field(
        default=SYNC_ADDRESS,
        metadata=option(
            "--sync-listen",
            "INFERENCE_SYNC_LISTEN",
            "sync plane (weight pushes) listen address",
            HOST_PORT,
        ),
    )
    metrics_listen: str | None = COMMON.metrics("127.0.0.1:9101")
    sync_token: str | None = field(
        default=None,
        metadata=option(
            "--sync-token",
            "INFERENCE_SYNC_TOKEN",
            "bearer token trainers must present on the sync plane (prefer the env var: flags "
            "show in ps)",
            convert=TOKEN,
        ),
    )
    data_token: str | None = field(
        default=None,
        metadata=option(
            "--data-token",
            "INFERENCE_DATA_TOKEN",
            "bearer token clients must present on the data plane",
            default_text="none (open)",
            convert=TOKEN,
        ),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=option(
            "--tls-cert", "INFERENCE_TLS_CERT", "PEM certificate: serve both planes over TLS", PATH
        ),
    )
    tls_key: Path | None = field(
        default=None,
        metadata=option("--tls-key", "INFERENCE_TLS_KEY", "PEM private key of --tls-cert", PATH),
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=option(
            "--tls-client-ca",
            "INFERENCE_TLS_CLIENT_CA",
            "PEM CA: require client certificates it signed (mutual TLS) on both planes; it does "
            "not count as the sync plane's authentication, since every data-plane client holds "
            "one",
            PATH,
        ),
    )
    tls_sync_client_ca: Path | None = field(
        default=None,
        metadata=option(
            "--tls-sync-client-ca",
            "INFERENCE_TLS_SYNC_CLIENT_CA",
            "PEM CA for the sync plane alone: require sync-plane clients to present "
            "certificates it signed instead of --tls-client-ca's; this authenticates the sync "
            "plane without a token",
            PATH,
        ),
    )
    tls_peer_ca: Path | None = field(
        default=None,
        metadata=option(
            "--tls-peer-ca",
            "INFERENCE_TLS_PEER_CA",
            "PEM CA to verify the replicas this one passes pushes on to (trainers route pushes "
            "through replicas; with --tls-cert the next one is dialled over TLS)",
            PATH,
            default_text="the system's CAs",
        ),
    )
    tls_peer_cert: Path | None = field(
        default=None,
        metadata=option(
            "--tls-peer-cert",
            "INFERENCE_TLS_PEER_CERT",
            "PEM client certificate presented to the replicas this one passes pushes on to, "
            "where their sync plane requires mutual TLS",
            PATH,
        ),
    )
    tls_peer_key: Path | None = field(
        default=None,
        metadata=option(
            "--tls-peer-key", "INFERENCE_TLS_PEER_KEY", "PEM private key of --tls-peer-cert", PATH
        ),
    )
    allow_open_sync: bool = field(
        default=False,
        metadata=option(
            "--allow-open-sync",
            "INFERENCE_ALLOW_OPEN_SYNC",
            "start even though the sync plane listens beyond loopback with no token or client CA",
            BOOLEAN,
            switch=True,
        ),
    )
    device: str = COMMON.device()
    state_dir: Path | None = field(
        default=None,
        metadata=option(
            "--state-dir",
            "INFERENCE_STATE_DIR",
            "directory that keeps the last committed weights of each model across restarts; "
            "'{slot}' in it takes the lowest-numbered directory no other replica holds",
            PATH,
        ),
    )
    history: int = field(
        default=HISTORY,
        metadata=option(
            "--history",
            "INFERENCE_HISTORY",
            "committed versions of each model kept in --state-dir, to list and roll back to",
            integer(1),
        ),
    )
    max_push_bytes: int = field(
        default=SyncLimits.max_payload_bytes,
        metadata=option(
            "--max-push-bytes", "INFERENCE_MAX_PUSH_BYTES", "largest push payload accepted", SIZE
        ),
    )
    max_header_bytes: int = field(
        default=SyncLimits.max_header_bytes,
        metadata=option(
            "--max-header-bytes",
            "INFERENCE_MAX_HEADER_BYTES",
            "largest safetensors header accepted in a push",
            SIZE,
        ),
    )
    max_concurrent_pushes: int = field(
        default=SyncLimits.max_concurrent,
        metadata=option(
            "--max-concurrent-pushes",
            "INFERENCE_MAX_CONCURRENT_PUSHES",
            "sync-plane calls handled at once (pushes, seeds, rollbacks; lookups such as "
            "GetModel have 4 slots of their own); more get RESOURCE_EXHAUSTED",
            integer(1),
        ),
    )
    max_batch_size: int = field(
        default=BatchingConfig.max_batch_size,
        metadata=option(
            "--max-batch-size",
            "INFERENCE_MAX_BATCH_SIZE",
            "rows per dynamic batch for models whose tensors lead with -1 (1: no batching)",
            integer(1),
        ),
    )
    max_queue_delay_s: float = field(
        default=BatchingConfig.max_queue_delay_s,
        metadata=option(
            "--max-queue-delay-ms",
            "INFERENCE_MAX_QUEUE_DELAY_MS",
            "longest a request waits for others to batch with, which it does only after a "
            "batch of several requests (0: batch only what is already queued)",
            duration("ms"),
        ),
    )
    max_queue: int = field(
        default=BatchingConfig.max_queue,
        metadata=option(
            "--max-queue",
            "INFERENCE_MAX_QUEUE",
            "requests queued per model; more get UNAVAILABLE",
            integer(1),
        ),
    )
    max_requests_in_flight: int = field(
        default=RequestLimits.max_requests_per_model,
        metadata=option(
            "--max-requests-in-flight",
            "INFERENCE_MAX_REQUESTS_IN_FLIGHT",
            "inference requests per model admitted and not yet run (queued for a batch or a "
            "worker, or running; on a ModelStreamInfer stream, until the answer is handed to "
            "gRPC); more get RESOURCE_EXHAUSTED",
            integer(1),
        ),
    )
    max_request_bytes_in_flight: int = field(
        default=RequestLimits.max_bytes,
        metadata=option(
            "--max-request-bytes-in-flight",
            "INFERENCE_MAX_REQUEST_BYTES_IN_FLIGHT",
            "bytes of request tensors that all inference requests in flight may hold together "
            "(answers waiting on ModelStreamInfer streams counted at their size); more get "
            "RESOURCE_EXHAUSTED",
            SIZE,
        ),
    )
    workers: int = field(
        default=WORKERS,
        metadata=option(
            "--workers",
            "INFERENCE_WORKERS",
            "threads running models that are not batched (the data plane itself is one event loop)",
            integer(1),
        ),
    )
    sync_max_bytes_per_s: float = field(
        default=SyncLimits.max_bytes_per_s,
        metadata=option(
            "--sync-max-mb-per-s",
            "INFERENCE_SYNC_MAX_MB_PER_S",
            "receive weight pushes no faster than this many MB/s, to keep their CPU cost out "
            "of serving latency (0: no limit)",
            scaled("MB/S", 1e6),
        ),
    )
    push_idle_timeout_s: float = field(
        default=SyncLimits.push_idle_timeout_s,
        metadata=option(
            "--push-idle-timeout-s",
            "INFERENCE_PUSH_IDLE_TIMEOUT_S",
            "how long a weight push may send nothing before it is ended with "
            "DEADLINE_EXCEEDED, freeing the model for other pushes",
            duration("s", positive=True),
        ),
    )
    forward_stall_timeout_s: float = field(
        default=PeerAccess.stall_timeout_s,
        metadata=option(
            "--forward-stall-timeout-s",
            "INFERENCE_FORWARD_STALL_TIMEOUT_S",
            "how long a replica this service passes a push on to may take nothing before it is "
            "cut off and reported stalled, and the replicas after it are fed past it (at 1 "
            "Gbit/s and up a live replica takes the few MiB queued for it in tens of ms); its "
            "link is pinged every quarter of this (a second apart at the closest: gRPC's "
            "spacing) and dropped when nothing is acknowledged for half of it",
            duration("s", positive=True),
        ),
    )
    forward_replay_bytes: int = field(
        default=PeerAccess.replay_bytes,
        metadata=option(
            "--forward-replay-bytes",
            "INFERENCE_FORWARD_REPLAY_BYTES",
            "payload bytes of the push being passed on kept to resume the replica after a cut "
            "one, routing past it (0: none kept; the trainer pushes those replicas again)",
            Converter(lambda text: nbytes(text, 0), "SIZE", show_size),
        ),
    )
    push_resume_window_s: float = field(
        default=SyncLimits.push_resume_window_s,
        metadata=option(
            "--push-resume-window-s",
            "INFERENCE_PUSH_RESUME_WINDOW_S",
            "how long a weight push whose stream broke off before its commit is kept for a push "
            "resuming it from the bytes applied (0: not kept; any other push drops it)",
            duration("s"),
        ),
    )
    sync_nice: int = field(
        default=10,
        metadata=option(
            "--sync-nice",
            "INFERENCE_SYNC_NICE",
            "how much lower (nice, 0-19) the CPU priority of the sync relay process, and of "
            "the threads receiving weight pushes, is than that of serving",
            integer(0, 19),
        ),
    )
    sync_relay: str = field(
        default="auto",
        metadata=option(
            "--sync-relay",
            "INFERENCE_SYNC_RELAY",
            "receive pushes in a process of their own, which keeps their cost out of serving "
            "latency but copies each byte once more (auto: where this process may use 4 or "
            "more CPUs)",
            choice("auto", "on", "off"),
        ),
    )
    experience: tuple[str, ...] | None = recording.experience()
    experience_token: str | None = recording.experience_token()
    experience_tls: bool = recording.experience_tls()
    experience_tls_ca: Path | None = recording.experience_tls_ca()  # noqa: RUF009 (a field())
    experience_tls_cert: Path | None = recording.experience_tls_cert()  # noqa: RUF009 (a field())
    experience_tls_key: Path | None = recording.experience_tls_key()  # noqa: RUF009 (a field())
    experience_tls_server_name: str | None = recording.experience_tls_server_name()
    record_queue: int = recording.record_queue()
    record_queue_bytes: int = recording.record_queue_bytes()
    record_asked: bool = recording.record_asked()
    torch_threads: int = field(
        default=0,
        metadata=option(
            "--torch-threads",
            "INFERENCE_TORCH_THREADS",
            "torch intra-op threads (0: OMP_NUM_THREADS where set, else one per CPU the "
            "process may use, container quota included)",
            integer(0, MAX_TORCH_THREADS),
        ),
    )
    grace: float = field(
        default=10.0,
        metadata=option(
            "--grace",
            "INFERENCE_GRACE",
            "how long in-flight requests get to finish on SIGTERM",
            duration("s"),
        ),
    )
    ready_file: Path | None = field(
        default=None,
        metadata=option(
            "--ready-file",
            "INFERENCE_READY_FILE",
            "write the bound ports here as JSON once serving (for tests and orchestration)",
            PATH,
        ),
    )
    log_level: str = COMMON.log_level()

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> InferenceSettings:
        """Flags over `environ` (os.environ by default) over the declared defaults."""
        return parse_service(cls, OPTIONS, PROG, DESCRIPTION, argv, environ)


OPTIONS = options(InferenceSettings, Scope.INFERENCE)
