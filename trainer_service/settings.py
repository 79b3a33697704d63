"""The trainer service's settings: flags, each also an environment variable."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.cli import (
    LOG_LEVELS,
    Option,
    address_list,
    name_groups,
    name_list,
    optional_host_port,
    parse,
)

DESCRIPTION = (
    "Run the trainers an app defines; after each trainer run, push the changed weights of the "
    "models it used to every inference service."
)


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{value} is not positive")
    return number


OPTIONS = [
    Option(
        "--models",
        "TRAINER_MODELS",
        "import string of the app: package.module:attribute",
        required=True,
    ),
    Option(
        "--inference",
        "TRAINER_INFERENCE",
        "sync-plane addresses of the inference services, HOST:PORT[,HOST:PORT...]; a DNS "
        "name stands for every address it resolves to",
        ("127.0.0.1:8101",),
        address_list,
    ),
    Option(
        "--trainers",
        "TRAINER_TRAINERS",
        "comma-separated trainer names to run (default: every trainer the app defines)",
        None,
        name_list,
    ),
    Option(
        "--trainer-groups",
        "TRAINER_GROUPS",
        "groups of trainers, 'a,b;c': each process runs the first group whose directory under "
        "--state-dir no other process holds, so replicas of one service split the groups "
        "between them; a replica finding every group taken stands by",
        None,
        name_groups,
    ),
    Option(
        "--metrics-listen",
        "TRAINER_METRICS_LISTEN",
        "Prometheus /metrics listen address HOST:PORT, or 'off'",
        "127.0.0.1:9102",
        optional_host_port,
    ),
    Option(
        "--sync-token",
        "TRAINER_SYNC_TOKEN",
        "bearer token for the inference services' sync plane (prefer the env var)",
    ),
    Option(
        "--tls-ca",
        "TRAINER_TLS_CA",
        "PEM CA: connect over TLS, verifying the inference services against it",
        None,
        Path,
    ),
    Option("--tls-cert", "TRAINER_TLS_CERT", "PEM client certificate for mutual TLS", None, Path),
    Option("--tls-key", "TRAINER_TLS_KEY", "PEM private key of --tls-cert", None, Path),
    Option("--device", "TRAINER_DEVICE", "auto (CUDA when present), cpu, cuda or cuda:N", "auto"),
    Option(
        "--torch-threads",
        "TRAINER_TORCH_THREADS",
        "torch intra-op threads (0: OMP_NUM_THREADS where set, as torchrun sets it, else one per "
        "CPU the process may use, container quota included)",
        0,
        _non_negative_int,
    ),
    Option(
        "--state-dir",
        "TRAINER_STATE_DIR",
        "directory for model, optimizer and trainer state (saved on exit, loaded on start); a "
        "second trainer given the same directory stands by until the first exits",
        None,
        Path,
    ),
    Option("--trainer-id", "TRAINER_ID", "identity recorded with each pushed version", None),
    Option(
        "--max-runs",
        "TRAINER_MAX_RUNS",
        "stop after this many trainer runs (0: never)",
        0,
        _non_negative_int,
    ),
    Option(
        "--run-interval", "TRAINER_RUN_INTERVAL", "minimum seconds between trainer runs", 0.0, float
    ),
    Option(
        "--checkpoint-every",
        "TRAINER_CHECKPOINT_EVERY",
        "checkpoint to --state-dir every N trainer runs (0: only on exit)",
        10,
        _non_negative_int,
    ),
    Option(
        "--push-timeout", "TRAINER_PUSH_TIMEOUT", "deadline in seconds for one push", 600.0, float
    ),
    Option(
        "--connect-timeout",
        "TRAINER_CONNECT_TIMEOUT",
        "seconds an inference service has to answer before a sync counts it unreachable: it "
        "then lags, the others are fed, and it is caught up in the background when it answers",
        3.0,
        _positive_float,
    ),
    Option(
        "--log-level", "TRAINER_LOG_LEVEL", "logging level", "INFO", str.upper, choices=LOG_LEVELS
    ),
]


@dataclass(frozen=True)
class TrainerSettings:
    models: str
    inference: tuple[str, ...] = ("127.0.0.1:8101",)
    trainers: tuple[str, ...] | None = None
    trainer_groups: tuple[tuple[str, ...], ...] | None = None
    metrics_listen: str | None = "127.0.0.1:9102"
    sync_token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "auto"
    torch_threads: int = 0
    state_dir: Path | None = None
    trainer_id: str | None = None
    max_runs: int = 0
    run_interval: float = 0.0
    checkpoint_every: int = 10
    push_timeout: float = 600.0
    connect_timeout: float = 3.0
    log_level: str = "INFO"

    @property
    def writer_id(self) -> str:
        return self.trainer_id or f"{socket.gethostname()}-{os.getpid()}"

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> TrainerSettings:
        values: dict[str, Any] = parse(
            "trainer-service",
            DESCRIPTION,
            OPTIONS,
            argv,
            os.environ if environ is None else environ,
        )
        return cls(**values)
