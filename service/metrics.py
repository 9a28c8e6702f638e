"""Every Prometheus metric convserve exports, declared once (DESIGN.md section 6).

Other modules only observe. Label values come only from served models: a request naming an
unknown model is counted under ``model="_unknown"``, so clients cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "BATCHES",
    "BATCH_SIZE",
    "COMPUTE_DURATION",
    "DENSE_CELLS",
    "DROPPED",
    "INFERENCES",
    "INFLIGHT",
    "MODEL_READY",
    "QUEUE_DEPTH",
    "QUEUE_DURATION",
    "REQUESTS",
    "REQUEST_DURATION",
    "UNKNOWN_MODEL",
    "serve_metrics",
]

UNKNOWN_MODEL = "_unknown"
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "convserve_requests_total",
    "Requests finished, by model, version, API and gRPC status code.",
    ["model", "version", "api", "code"],
)
REQUEST_DURATION = Histogram(
    "convserve_request_duration_seconds",
    "End-to-end request time inside the server.",
    ["model", "api"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "convserve_queue_duration_seconds",
    "Time from enqueue to the start of the request's batch.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "convserve_compute_duration_seconds",
    "Time one batch spends in the runtime.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "convserve_batch_size", "Images per executed batch.", ["model"], buckets=BATCH_BUCKETS
)
INFERENCES = Counter("convserve_inferences_total", "Images inferred.", ["model"])
BATCHES = Counter("convserve_batches_total", "Batches executed.", ["model"])
QUEUE_DEPTH = Gauge("convserve_queue_depth", "Images waiting in the model's queue.", ["model"])
INFLIGHT = Gauge("convserve_inflight_requests", "Requests inside the server.")
DROPPED = Counter(
    "convserve_dropped_requests_total",
    "Requests dropped before compute, by reason: deadline, cancelled, queue_full, draining.",
    ["model", "reason"],
)
MODEL_READY = Gauge(
    "convserve_model_ready",
    "1 when the model version is loaded and warm.",
    ["model", "version", "provider"],
)
DENSE_CELLS = Counter("convserve_dense_cells_total", "Score-map cells computed.", ["model"])


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
