"""`inference-service` / `python -m inference_service`: serve an app's models."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from inference_service.dataplane.admission import RequestLimits
from inference_service.dataplane.batcher import BatchingConfig
from inference_service.loading import load_models
from inference_service.persistence import WeightStore
from inference_service.server import InferenceServer
from inference_service.settings import InferenceSettings
from inference_service.syncplane.receiver import SyncLimits
from inference_service.syncplane.relay_process import relay_wanted
from shared.allocator import tune_for_streaming
from shared.app import load_app
from shared.cli import configure_logging, is_loopback
from shared.devices import resolve_device, size_torch_threads
from shared.errors import ConfigurationError
from shared.grpc.auth import TlsFiles
from shared.grpc.server import write_ready_file
from shared.metrics import serve_metrics
from shared.statedir import claim

logger = logging.getLogger("inference_service")


def package_version() -> str:
    try:
        return version("weightsync")
    except PackageNotFoundError:
        return "0+unknown"


def check_sync_access(settings: InferenceSettings) -> None:
    """Refuse settings under which the sync plane's guard would not hold."""
    if settings.sync_token and settings.sync_token == settings.data_token:
        raise ConfigurationError(
            "INFERENCE_SYNC_TOKEN and INFERENCE_DATA_TOKEN are the same: every client of the "
            "data plane could push weights; give the sync plane a token of its own"
        )
    if settings.tls_sync_client_ca is not None and (
        settings.tls_cert is None or settings.tls_key is None
    ):
        raise ConfigurationError(
            "--tls-sync-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first"
        )


def run(settings: InferenceSettings) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    sync_tls = TlsFiles(
        settings.tls_cert, settings.tls_key, settings.tls_sync_client_ca or settings.tls_client_ca
    )
    check_sync_access(settings)
    # A client CA shared with the data plane authenticates no one on the sync plane: every
    # data-plane client holds a certificate it signed.
    open_sync = not settings.sync_token and settings.tls_sync_client_ca is None
    if open_sync and not is_loopback(settings.sync_listen):
        if not settings.allow_open_sync:
            raise ConfigurationError(
                f"the sync plane would listen on {settings.sync_listen} with no authentication: "
                "set INFERENCE_SYNC_TOKEN (or --tls-sync-client-ca for mutual TLS with a CA of "
                "its own: a --tls-client-ca shared with the data plane would let any data-plane "
                "client push), or pass --allow-open-sync on a network you trust"
            )
        logger.warning(
            "THE SYNC PLANE LISTENS ON %s WITHOUT AUTHENTICATION (--allow-open-sync): anyone "
            "who can reach it can replace the served weights.",
            settings.sync_listen,
        )
    device = resolve_device(settings.device)
    threads = size_torch_threads(settings.torch_threads)
    logger.info("torch: %d intra-op thread(s); %d request worker(s)", threads, settings.workers)
    models = load_models(load_app(settings.models), device)
    store = None
    if settings.state_dir is not None:
        state = claim(settings.state_dir)
        assert state is not None  # claim() without `wait` raises rather than returning None
        logger.info("state directory %s", state.path)
        store = WeightStore(state.path / "models", settings.history)
        for model in models.values():
            if model.accepts_pushes:
                store.restore(model)
    server = InferenceServer(
        models,
        listen=settings.listen,
        sync_listen=settings.sync_listen,
        workers=settings.workers,
        limits=SyncLimits(
            max_payload_bytes=settings.max_push_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_concurrent=settings.max_concurrent_pushes,
            max_bytes_per_s=settings.sync_max_mb_per_s * 1e6,
            push_idle_timeout_s=settings.push_idle_timeout_s,
        ),
        server_version=package_version(),
        batching=BatchingConfig(
            settings.max_batch_size, settings.max_queue_delay_ms / 1000, settings.max_queue
        ),
        request_limits=RequestLimits(
            settings.max_requests_in_flight, settings.max_request_bytes_in_flight
        ),
        store=store,
        sync_token=settings.sync_token,
        data_token=settings.data_token,
        tls=tls if tls.enabled else None,
        sync_tls=sync_tls if sync_tls.enabled else None,
        sync_nice=settings.sync_nice,
        sync_relay=relay_wanted(settings.sync_relay),
        log_level=settings.log_level,
    )
    ports = server.start()
    # What exists now (torch, grpc, the models, warmed up) lives as long as the process. Out of
    # the collector's reach, it no longer makes each full collection walk ~180,000 objects:
    # under load those took 60-80 ms every two seconds or so, stalling every request in flight
    # (64 clients: p99 87 ms against a p50 of 21 ms; frozen, a full collection takes under a
    # millisecond and p99 was 30 ms).
    gc.freeze()
    metrics_port = serve_metrics(settings.metrics_listen) if settings.metrics_listen else None
    if settings.ready_file is not None:
        write_ready_file(
            settings.ready_file,
            {
                "pid": os.getpid(),
                "data_port": ports.data,
                "sync_port": ports.sync,
                "metrics_port": metrics_port,
                "sync_relay_pid": server.sync_relay_pid,
            },
        )
    stop.wait()
    logger.info("shutting down: draining for up to %gs", settings.grace)
    server.stop(settings.grace)


def main(argv: Sequence[str] | None = None) -> int:
    settings = InferenceSettings.from_args(argv)
    configure_logging(settings.log_level)
    tune_for_streaming()
    try:
        run(settings)
    except (ConfigurationError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
