"""`inference-service` / `python -m inference_service`: serve an app's models."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

from inference_service.dataplane.admission import RequestLimits
from inference_service.dataplane.batcher import BatchingConfig
from inference_service.dataplane.service import DataPlane
from inference_service.loading import load_models
from inference_service.persistence import WeightStore
from inference_service.persister import Persister
from inference_service.recording import Recorder
from inference_service.served_model import ServedModel
from inference_service.server import DataEndpoint, InferenceServer, SyncEndpoint
from inference_service.settings import PROG, InferenceSettings
from inference_service.syncplane.forward import PeerAccess
from inference_service.syncplane.limits import SyncLimits, sync_budget
from inference_service.syncplane.relay.supervisor import RelayConfig, RelaySupervisor, relay_wanted
from inference_service.syncplane.service import SyncPlane
from shared.app import load_app
from shared.cli import is_loopback
from shared.devices import resolve_device, size_torch_threads
from shared.errors import ConfigurationError
from shared.grpc.auth import TlsFiles
from shared.grpc.server import write_ready_file
from shared.metrics import serve_metrics
from shared.process import end_process, prepare_process, watch_stop_signals
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
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigurationError(
            "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first"
        )
    if (settings.tls_peer_cert is None) != (settings.tls_peer_key is None):
        raise ConfigurationError("--tls-peer-cert and --tls-peer-key go together")
    if settings.tls_sync_client_ca is not None and (
        settings.tls_cert is None or settings.tls_key is None
    ):
        raise ConfigurationError(
            "--tls-sync-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first"
        )


def experience_tls(settings: InferenceSettings) -> TlsFiles | None:
    """TLS to the trainers' experience planes, when asked for (None: plaintext)."""
    files = TlsFiles(
        settings.experience_tls_cert, settings.experience_tls_key, settings.experience_tls_ca
    )
    if (files.cert is None) != (files.key is None):
        raise ConfigurationError("--experience-tls-cert and --experience-tls-key go together")
    if settings.experience_tls_server_name and not (settings.experience_tls or files.enabled):
        raise ConfigurationError("--experience-tls-server-name needs TLS: --experience-tls-ca")
    files.check()  # a bad file stops the start, not every recorded batch after it
    return files if settings.experience_tls or files.enabled else None


def peer_access(settings: InferenceSettings, limits: SyncLimits) -> PeerAccess:
    """How pushes are passed on to other replicas: with the sync plane's own token, over TLS
    when the sync plane serves TLS."""
    tls = None
    if settings.tls_cert is not None:
        tls = TlsFiles(settings.tls_peer_cert, settings.tls_peer_key, settings.tls_peer_ca)
        tls.check()  # a bad file stops the start, not every push passed on after it
    return PeerAccess(
        settings.sync_token,
        tls,
        settings.forward_stall_timeout_s,
        limits.push_idle_timeout_s,
        settings.forward_replay_bytes,
    )


def build_server(
    settings: InferenceSettings,
    models: Mapping[str, ServedModel],
    store: WeightStore | None = None,
    recorder: Recorder | None = None,
) -> InferenceServer:
    """The composition root: build the parts `settings` call for around `models` (and `store`,
    which keeps their history) and hand them to the server."""
    tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    # The sync plane's TLS differs from the data plane's when it has a client CA of its own.
    sync_tls = TlsFiles(
        settings.tls_cert, settings.tls_key, settings.tls_sync_client_ca or settings.tls_client_ca
    )
    limits = SyncLimits(
        max_payload_bytes=settings.max_push_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_concurrent=settings.max_concurrent_pushes,
        max_bytes_per_s=settings.sync_max_bytes_per_s,
        push_idle_timeout_s=settings.push_idle_timeout_s,
        push_resume_window_s=settings.push_resume_window_s,
    )
    persister = Persister(store, models) if store is not None else None
    sync_plane = SyncPlane(
        models,
        limits,
        persister.committed if persister is not None else None,
        store,
        peer_access(settings, limits),
    )
    data_plane = DataPlane(
        models,
        BatchingConfig(settings.max_batch_size, settings.max_queue_delay_s, settings.max_queue),
        settings.workers,
        RequestLimits(settings.max_requests_in_flight, settings.max_request_bytes_in_flight),
        recorder,
    )
    data = DataEndpoint(
        settings.listen, tls if tls.enabled else None, settings.data_token, package_version()
    )
    sync = SyncEndpoint(
        settings.sync_listen,
        sync_tls if sync_tls.enabled else None,
        settings.sync_token,
        settings.data_token,
        sync_budget(limits.max_concurrent),
        settings.sync_nice,
    )
    relay = None
    if relay_wanted(settings.sync_relay):
        relay_config = RelayConfig(
            sync.listen,
            sync.budget.calls,
            sync.nice,
            sync.tls,
            sync.token,
            sync.weaker_token,
            settings.log_level,
        )
        relay = RelaySupervisor(sync_plane.push, relay_config)
    return InferenceServer(data_plane, sync_plane, data, sync, relay=relay, persister=persister)


def open_store(
    settings: InferenceSettings, models: Mapping[str, ServedModel]
) -> WeightStore | None:
    """The history under --state-dir, if given, with each model's last version restored."""
    if settings.state_dir is None:
        return None
    state = claim(settings.state_dir)
    assert state is not None  # claim() without `wait` raises rather than returning None
    logger.info("state directory %s", state.path)
    store = WeightStore(state.path / "models", settings.history)
    for model in models.values():
        if model.accepts_pushes:
            store.restore(model)
    return store


def run(settings: InferenceSettings) -> None:
    stop = threading.Event()
    watch_stop_signals(stop, f"draining for up to {settings.grace:g}s", "the drain")
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
    app = load_app(settings.models)
    models = load_models(app, device)
    recorder = Recorder(
        app.models,
        app.buffers,
        settings.experience,
        token=settings.experience_token,
        tls=experience_tls(settings),
        server_name=settings.experience_tls_server_name,
        max_queue=settings.record_queue,
        max_queue_bytes=settings.record_queue_bytes,
        record_asked=settings.record_asked,
    )
    server = build_server(settings, models, open_store(settings, models), recorder)
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
    recorder.close()


def main(argv: Sequence[str] | None = None) -> int:
    settings = InferenceSettings.from_args(argv, os.environ)
    prepare_process(PROG, settings.log_level)
    try:
        run(settings)
    except (ConfigurationError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    end_process(main())
