"""The trainer service's settings: each option declared once (shared/settings.py).

docs/configuration.md is generated from this file.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.cli import (
    BOOLEAN,
    NAME_GROUPS,
    NAMES,
    OPTIONAL_HOST_PORT,
    PATH,
    SIZE,
    TOKEN,
    WRITER_ID,
    Converter,
    choice,
    duration,
    integer,
)
from shared.devices import MAX_TORCH_THREADS
from shared.settings import SYNC_ADDRESS, Scope, ServiceOptions, option, options, parse_service
from trainer_service.encoding_choice import AUTO, CHOICES
from trainer_service.experience.idle import DEFAULT_IDLE_TIMEOUT_S
from trainer_service.experience.server import DEFAULT_STREAMS
from trainer_service.experience.service import DEFAULT_MAX_BATCH_BYTES
from trainer_service.names import checked
from trainer_service.push import DEFAULT_STALL_TIMEOUT_S

PROG = Scope.TRAINER.value
DESCRIPTION = (
    "Run the trainers an app defines; after each trainer run, push the changed weights of the "
    "models it used to every inference service."
)

COMMON = ServiceOptions("TRAINER")


def _targets(value: str) -> tuple[str, ...]:
    items = tuple(checked(v.strip()) for v in value.split(",") if v.strip())
    if not items:
        raise ValueError("expected one or more HOST:PORT, comma-separated")
    return items


# Checked when the trainer starts: a target it could never dial is refused there, not retried.
TARGETS = Converter(_targets, "HOST:PORT[,...]")


@dataclass(frozen=True)
class TrainerSettings:
    models: str = COMMON.models()
    inference: tuple[str, ...] = field(
        default=(SYNC_ADDRESS,),
        metadata=option(
            "--inference",
            "TRAINER_INFERENCE",
            "sync-plane addresses of the inference services, comma-separated HOST:PORT (an "
            "IPv6 address in brackets, [::1]:8101; no scheme); a DNS name stands for every "
            "address it resolves to",
            TARGETS,
        ),
    )
    trainers: tuple[str, ...] | None = field(
        default=None,
        metadata=option(
            "--trainers",
            "TRAINER_TRAINERS",
            "comma-separated trainer names to run",
            NAMES,
            default_text="every trainer the app defines",
        ),
    )
    trainer_groups: tuple[tuple[str, ...], ...] | None = field(
        default=None,
        metadata=option(
            "--trainer-groups",
            "TRAINER_GROUPS",
            "groups of trainers, 'a,b;c': each process runs the first group whose directory "
            "under --state-dir no other process holds, so replicas of one service split the "
            "groups between them; a replica finding every group taken stands by",
            NAME_GROUPS,
        ),
    )
    metrics_listen: str | None = COMMON.metrics("127.0.0.1:9102")
    sync_token: str | None = field(
        default=None,
        metadata=option(
            "--sync-token",
            "TRAINER_SYNC_TOKEN",
            "bearer token for the inference services' sync plane (prefer the env var: flags "
            "show in ps)",
            convert=TOKEN,
        ),
    )
    tls_ca: Path | None = field(
        default=None,
        metadata=option(
            "--tls-ca",
            "TRAINER_TLS_CA",
            "PEM CA: connect over TLS, verifying the inference services against it",
            PATH,
        ),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=option(
            "--tls-cert", "TRAINER_TLS_CERT", "PEM client certificate for mutual TLS", PATH
        ),
    )
    tls_key: Path | None = field(
        default=None,
        metadata=option("--tls-key", "TRAINER_TLS_KEY", "PEM private key of --tls-cert", PATH),
    )
    experience_listen: str | None = field(
        default="127.0.0.1:8201",
        metadata=option(
            "--experience-listen",
            "TRAINER_EXPERIENCE_LISTEN",
            "experience plane listen address, where agents stream samples into the app's "
            "buffers (only when the app declares buffers), or 'off'",
            OPTIONAL_HOST_PORT,
        ),
    )
    experience_token: str | None = field(
        default=None,
        metadata=option(
            "--experience-token",
            "TRAINER_EXPERIENCE_TOKEN",
            "bearer token agents must present on the experience plane (prefer the env var: "
            "flags show in ps)",
            convert=TOKEN,
        ),
    )
    experience_tls_cert: Path | None = field(
        default=None,
        metadata=option(
            "--experience-tls-cert",
            "TRAINER_EXPERIENCE_TLS_CERT",
            "PEM certificate: serve the experience plane over TLS",
            PATH,
        ),
    )
    experience_tls_key: Path | None = field(
        default=None,
        metadata=option(
            "--experience-tls-key",
            "TRAINER_EXPERIENCE_TLS_KEY",
            "PEM private key of --experience-tls-cert",
            PATH,
        ),
    )
    experience_tls_client_ca: Path | None = field(
        default=None,
        metadata=option(
            "--experience-tls-client-ca",
            "TRAINER_EXPERIENCE_TLS_CLIENT_CA",
            "PEM CA: require agents to present certificates it signed (mutual TLS); this "
            "authenticates the experience plane without a token",
            PATH,
        ),
    )
    allow_open_experience: bool = field(
        default=False,
        metadata=option(
            "--allow-open-experience",
            "TRAINER_ALLOW_OPEN_EXPERIENCE",
            "start even though the experience plane listens beyond loopback with no token or "
            "client CA",
            BOOLEAN,
            switch=True,
        ),
    )
    experience_max_batch: int = field(
        default=DEFAULT_MAX_BATCH_BYTES,
        metadata=option(
            "--experience-max-batch",
            "TRAINER_EXPERIENCE_MAX_BATCH",
            "largest batch payload an agent may send; larger ones are refused, nothing stored",
            SIZE,
        ),
    )
    experience_streams: int = field(
        default=DEFAULT_STREAMS,
        metadata=option(
            "--experience-streams",
            "TRAINER_EXPERIENCE_STREAMS",
            "agents' streams served at once (each holds a thread); one beyond gets "
            "RESOURCE_EXHAUSTED and retries (ListBuffers has 4 slots of its own)",
            integer(1),
        ),
    )
    experience_idle_timeout_s: float = field(
        default=DEFAULT_IDLE_TIMEOUT_S,
        metadata=option(
            "--experience-idle-timeout-s",
            "TRAINER_EXPERIENCE_IDLE_TIMEOUT_S",
            "how long an agent's stream may send no batch and take no acknowledgement before "
            "it is ended with DEADLINE_EXCEEDED, freeing its slot (agents end their own idle "
            "streams sooner); what it was acknowledged stays stored",
            duration("s", positive=True),
        ),
    )
    device: str = COMMON.device()
    torch_threads: int = field(
        default=0,
        metadata=option(
            "--torch-threads",
            "TRAINER_TORCH_THREADS",
            "torch intra-op threads (0: OMP_NUM_THREADS where set, as torchrun sets it, else "
            "one per CPU the process may use, container quota included)",
            integer(0, MAX_TORCH_THREADS),
        ),
    )
    state_dir: Path | None = field(
        default=None,
        metadata=option(
            "--state-dir",
            "TRAINER_STATE_DIR",
            "directory for model, optimizer and trainer state (saved on exit, loaded on start); "
            "a second trainer given the same directory stands by until the first exits",
            PATH,
        ),
    )
    trainer_id: str | None = field(
        default=None,
        metadata=option(
            "--trainer-id",
            "TRAINER_ID",
            "identity recorded with each pushed version (at most 256 bytes)",
            WRITER_ID,
            default_text="HOST-PID",
        ),
    )
    max_runs: int = field(
        default=0,
        metadata=option(
            "--max-runs",
            "TRAINER_MAX_RUNS",
            "stop after this many trainer runs (0: never)",
            integer(0),
        ),
    )
    run_interval: float = field(
        default=0.0,
        metadata=option(
            "--run-interval",
            "TRAINER_RUN_INTERVAL",
            "least time between trainer runs",
            duration("s"),
        ),
    )
    checkpoint_every: int = field(
        default=10,
        metadata=option(
            "--checkpoint-every",
            "TRAINER_CHECKPOINT_EVERY",
            "checkpoint to --state-dir every N trainer runs (0: only on exit)",
            integer(0),
        ),
    )
    push_timeout: float = field(
        default=600.0,
        metadata=option(
            "--push-timeout",
            "TRAINER_PUSH_TIMEOUT",
            "deadline for one push",
            duration("s", positive=True),
        ),
    )
    connect_timeout: float = field(
        default=3.0,
        metadata=option(
            "--connect-timeout",
            "TRAINER_CONNECT_TIMEOUT",
            "how long an inference service has to answer before a sync counts it unreachable: "
            "it then lags, the others are fed, and it is caught up in the background when it "
            "answers",
            duration("s", positive=True),
        ),
    )
    push_stall_timeout: float = field(
        default=DEFAULT_STALL_TIMEOUT_S,
        metadata=option(
            "--push-stall-timeout-s",
            "TRAINER_PUSH_STALL_TIMEOUT_S",
            "how long a push's stream may take nothing (a link cut mid-push, a service stuck), "
            "or, once the whole push has left, how long its service may apply nothing more of "
            "it (asked with GetModel), before it is cancelled: that inference service then "
            "lags and is caught up in the background, and the sync returns with the others; a "
            "push, or a replica asked to "
            "seed another (the other is then pushed directly), is given up sooner when its link "
            "answers no ping for half of it (the service's host stopped or its link went dark, "
            "also once the whole push has left)",
            duration("s", positive=True),
        ),
    )
    stop_sync_timeout: float = field(
        default=10.0,
        metadata=option(
            "--stop-sync-timeout-s",
            "TRAINER_STOP_SYNC_TIMEOUT_S",
            "once the trainer is stopping (SIGTERM, SIGINT), how long the pushes of its last "
            "sync may still take before they are cancelled (their inference services lag, "
            "keep the version they serve, and are caught up at the next start) so that the "
            "checkpoint is written before an orchestrator kills the process",
            duration("s"),
        ),
    )
    fanout: str = field(
        default="chain",
        metadata=option(
            "--fanout",
            "TRAINER_FANOUT",
            "how a push reaches several inference services: chain (one push, each service "
            "passing it on to the next as it arrives, so the trainer's link carries one copy) "
            "or direct (one push per service)",
            choice("chain", "direct"),
        ),
    )
    catch_up_from_peers: bool = field(
        default=True,
        metadata=option(
            "--catch-up-from-peers",
            "TRAINER_CATCH_UP_FROM_PEERS",
            "catch a new or lagging inference service up from another that already serves the "
            "newest version (it pushes its copy, a Seed), so the trainer's link does not carry "
            "one more; the trainer pushes directly when none can (false: always directly)",
            BOOLEAN,
        ),
    )
    push_encoding: str = field(
        default=AUTO,
        metadata=option(
            "--push-encoding",
            "TRAINER_PUSH_ENCODING",
            "how the changed tensors of a delta travel: auto (per tensor, whichever of whole "
            "bytes and the encodings costs least on the target's measured link; whole on "
            "loopback), whole, or one encoding forced where the target holds the base: "
            "xor-zstd, xor-lz4, sparse (see docs/sync.md)",
            choice(*CHOICES),
        ),
    )
    ready_file: Path | None = field(
        default=None,
        metadata=option(
            "--ready-file",
            "TRAINER_READY_FILE",
            "write the pid and the bound ports of the experience plane and the metrics "
            "(null where off) here as JSON once ready (for tests and orchestration)",
            PATH,
        ),
    )
    log_level: str = COMMON.log_level()

    @property
    def writer_id(self) -> str:
        return self.trainer_id or f"{socket.gethostname()}-{os.getpid()}"

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> TrainerSettings:
        """Flags over `environ` (os.environ by default) over the declared defaults."""
        return parse_service(cls, OPTIONS, PROG, DESCRIPTION, argv, environ)


OPTIONS = options(TrainerSettings, Scope.TRAINER)
