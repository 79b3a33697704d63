"""The trainer service's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import PUSH_BUCKETS

PUSHES = Counter(
    "weightsync_trainer_pushes_total",
    "Pushes to one inference service, by model, kind (full, delta) and result",
    ["model", "kind", "result"],
)
PUSH_BYTES = Counter(
    "weightsync_trainer_push_bytes_total", "Payload bytes pushed and committed", ["model", "kind"]
)
SYNC_SECONDS = Histogram(
    "weightsync_trainer_sync_duration_seconds",
    "Time for one sync: every reachable inference service committed",
    ["model"],
    buckets=PUSH_BUCKETS,
)
SYNC_FAILURES = Counter(
    "weightsync_trainer_sync_failures_total",
    "Syncs that failed: a reachable inference service refused the version, or none was reachable",
    ["model"],
)
MODEL_VERSION = Gauge(
    "weightsync_trainer_model_version",
    "Last version committed on every inference service that could be reached",
    ["model"],
)
RUNS = Counter("weightsync_trainer_runs_total", "Completed trainer runs", ["trainer"])
TARGET_LAGGING = Gauge(
    "weightsync_trainer_target_lagging",
    "1 while an inference service (an address) misses the model's newest version and is being "
    "caught up in the background, else 0",
    ["model", "target"],
)
TARGET_VERSION = Gauge(
    "weightsync_trainer_target_version",
    "The last version of the model an inference service (an address) acknowledged",
    ["model", "target"],
)
WIRE_BYTES = Counter(
    "weightsync_trainer_wire_bytes_total",
    "Tensor bytes of committed pushes, by model and the encoding they travelled in (whole, "
    "xor-zstd, xor-lz4, sparse)",
    ["model", "encoding"],
)
ENCODE_SECONDS = Counter(
    "weightsync_trainer_encode_seconds_total",
    "Time spent encoding changed tensors against their base, by encoding",
    ["encoding"],
)
ENCODE_CPU_SECONDS = Counter(
    "weightsync_trainer_encode_cpu_seconds_total",
    "CPU time of the encoding threads spent encoding changed tensors (what one core does, "
    "where the host is shared), by encoding",
    ["encoding"],
)
ENCODED_BYTES = Counter(
    "weightsync_trainer_encoded_tensor_bytes_total",
    "Bytes of changed tensors put through an encoder (their dense size), by encoding",
    ["encoding"],
)
LINK_RATE = Gauge(
    "weightsync_trainer_link_bytes_per_second",
    "The link rate to an inference service (an address), measured from recent pushes: "
    "payload bytes over the push's stream (its seconds less the service's own after the last "
    "message, finish_seconds), a running average",
    ["target"],
)
