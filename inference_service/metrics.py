"""The inference service's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import PUSH_BUCKETS

PUSHES = Counter(
    "weightsync_inference_pushes_total",
    "Weight pushes received, by model and result (committed, rejected)",
    ["model", "result"],
)
PUSH_BYTES = Counter(
    "weightsync_inference_push_bytes_total", "Payload bytes of committed pushes", ["model"]
)
PUSH_SECONDS = Histogram(
    "weightsync_inference_push_duration_seconds",
    "Time from a push's header to its swap",
    ["model"],
    buckets=PUSH_BUCKETS,
)
SWAP_SECONDS = Histogram(
    "weightsync_inference_swap_duration_seconds",
    "How long a commit holds the lock that requests take to pick their weights (the only "
    "pause a push causes on the request path)",
    ["model"],
    buckets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
)
DECODE_SECONDS = Counter(
    "weightsync_inference_decode_seconds_total",
    "Time spent decoding encoded tensors of pushes against their base, by model and encoding",
    ["model", "encoding"],
)
MODEL_VERSION = Gauge("weightsync_inference_model_version", "Version being served", ["model"])
REQUESTS = Counter(
    "weightsync_inference_requests_total",
    "Inference requests (ModelInfer and each ModelStreamInfer request) by model and gRPC status "
    "code; model is '' for names the service does not serve",
    ["model", "code"],
)
REQUESTS_IN_FLIGHT = Gauge(
    "weightsync_inference_requests_in_flight",
    "Inference requests admitted and not yet run (queued, or running; on a ModelStreamInfer "
    "stream, until the answer is handed to gRPC), by model; bounded by --max-requests-in-flight",
    ["model"],
)
REQUEST_BYTES_IN_FLIGHT = Gauge(
    "weightsync_inference_request_bytes_in_flight",
    "Bytes of request tensors that requests in flight hold (answers waiting on ModelStreamInfer "
    "streams at their size); bounded by --max-request-bytes-in-flight",
)
QUEUE_SECONDS = Histogram(
    "weightsync_inference_queue_duration_seconds",
    "Time requests waited to be batched",
    ["model"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
)
BATCH_SIZE = Histogram(
    "weightsync_inference_batch_size",
    "Rows per executed batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_SECONDS = Histogram(
    "weightsync_inference_request_duration_seconds",
    "Time from a successful inference request's arrival at its model to its outputs: queue "
    "time and compute time",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "weightsync_inference_compute_duration_seconds",
    "Time each model execution took (a batch, or one request of a model run unbatched): "
    "joining inputs, the forward pass and collecting outputs",
    ["model"],
    buckets=(0.0001, *LATENCY_BUCKETS),
)
