"""Every Prometheus metric convserve exports, declared once (the table: docs/metrics.md).

Other modules only observe. Label values come only from served models: a request naming an
unknown model is counted under ``model="_unknown"``, so clients cannot grow the label set.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.core.ports import busy_port_message
from service.core.settings import SettingError

__all__ = [
    "BATCHES",
    "BATCH_SIZE",
    "COMPUTE_DURATION",
    "DENSE_CELLS",
    "DROPPED",
    "INFERENCES",
    "INFLIGHT",
    "LONGEST_INFERENCE",
    "MODEL_DEVICE_MEMORY",
    "MODEL_INFO",
    "MODEL_LOAD_FAILURES",
    "MODEL_READY",
    "QUEUE_DEPTH",
    "QUEUE_DURATION",
    "REQUESTS",
    "REQUEST_DURATION",
    "RESTRICTED_REFUSALS",
    "UNKNOWN_MODEL",
    "WORKER_METRICS",
    "WorkerCounts",
    "forget_info",
    "forget_ready",
    "gpu_memory_used",
    "multiprocess_registry",
    "register_gpu_metrics",
    "serve_metrics",
]

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown"
GPU_METRICS = (
    "convserve_gpu_utilization_ratio",
    "convserve_gpu_memory_used_bytes",
    "convserve_gpu_memory_total_bytes",
)
"""Exported only where NVML works (absent, not zero, without a GPU)."""
WORKER_METRICS = ("convserve_workers", "convserve_worker_restarts_total")
"""Exported only by the supervisor of ``serve --workers N`` (N > 1)."""
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
    "Requests finished, by model, version, API, gRPC status code (HTTP requests too) and "
    "protocol (grpc or http).",
    ["model", "version", "api", "code", "protocol"],
)
REQUEST_DURATION = Histogram(
    "convserve_request_duration_seconds",
    "End-to-end request time inside the server.",
    ["model", "api", "protocol"],
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
# With several worker processes (--workers), each gauge says how the workers' values combine.
QUEUE_DEPTH = Gauge(
    "convserve_queue_depth",
    "Images waiting in the model's queue.",
    ["model"],
    multiprocess_mode="livesum",
)
INFLIGHT = Gauge(
    "convserve_inflight_requests", "Requests inside the server.", multiprocess_mode="livesum"
)
LONGEST_INFERENCE = Gauge(
    "convserve_longest_inference_seconds",
    "How long the longest-running model call in the runtime has run (0: none is running); past "
    "--max-inference-seconds the server is wedged and its liveness NOT_SERVING.",
    multiprocess_mode="livemax",
)
DROPPED = Counter(
    "convserve_dropped_requests_total",
    "Requests dropped before compute, by reason: deadline, cancelled, queue_full, draining.",
    ["model", "reason"],
)
MODEL_READY = Gauge(
    "convserve_model_ready",
    "1 when the model version is loaded and warm (in every live worker).",
    ["model", "version", "provider"],
    multiprocess_mode="livemin",
)
# livemin as readiness: every worker writes 1, so the supervisor shows 1 (a sum would show N).
MODEL_INFO = Gauge(
    "convserve_model_info",
    "1 for every served model version, labelled with the precision its file is stored in and "
    "the execution provider that runs it.",
    ["model", "version", "precision", "provider"],
    multiprocess_mode="livemin",
)
MODEL_LOAD_FAILURES = Counter(
    "convserve_model_load_failures_total",
    "Model loads that failed (a file or config.json that does not load, or a load past "
    "--model-load-timeout-seconds); a served version of the model goes on serving.",
    ["model"],
)
DENSE_CELLS = Counter("convserve_dense_cells_total", "Score-map cells computed.", ["model"])
RESTRICTED_REFUSALS = Counter(
    "convserve_restricted_refusals_total",
    "Calls refused because a restricted API group's header was missing or wrong.",
    ["group"],
)
MODEL_DEVICE_MEMORY = Gauge(
    "convserve_model_device_memory_bytes",
    "GPU memory the model took when loaded and warmed up, summed over workers (NVML; absent "
    "on the CPU).",
    ["model"],
    multiprocess_mode="livesum",
)


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port.

    Raises:
        SettingError: the port is in use; the message names it and the flag that moves it.
    """
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise SettingError(busy_port_message("metrics", host, port, "metrics_port")) from None
    return int(server.server_port)


class WorkerCounts(Collector):
    """The supervisor's own figures, read at scrape time: live workers and restarts."""

    def __init__(self) -> None:
        self.live = 0
        self.restarts = 0

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The two families, with the values the supervisor last set."""
        yield GaugeMetricFamily(WORKER_METRICS[0], "Worker processes running.", value=self.live)
        yield CounterMetricFamily(
            WORKER_METRICS[1].removesuffix("_total"),
            "Worker processes restarted after they exited unexpectedly.",
            value=self.restarts,
        )


FORGOTTEN = math.inf
"""What a worker writes for a readiness series it has dropped (see :func:`forget_ready`).

Readiness is the minimum over the live workers: infinity leaves another worker's 0 or 1 as the
minimum whatever order the workers' files are read in (NaN would not: a comparison with NaN is
false, so the first file read would win), and is left out only where every worker forgot it.
"""


def forget_ready(*labels: str) -> None:
    """Drop a ``convserve_model_ready`` series: the version was replaced or unloaded.

    A worker of ``serve --workers`` cannot remove a label set (prometheus_client's multiprocess
    mode keeps the last value in the worker's file), so it marks the series :data:`FORGOTTEN`,
    and the supervisor's :class:`_Workers` collector leaves such series out.
    """
    _forget(MODEL_READY, labels)


def forget_info(*labels: str) -> None:
    """Drop a ``convserve_model_info`` series, as :func:`forget_ready` does readiness."""
    _forget(MODEL_INFO, labels)


def _forget(gauge: Gauge, labels: tuple[str, ...]) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        gauge.labels(*labels).set(FORGOTTEN)
    else:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


class _Workers(Collector):
    """Every worker's metrics from their files, summed as declared, without forgotten series."""

    def __init__(self, path: str) -> None:
        self._files = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Any]:
        """The workers' families; series marked :data:`FORGOTTEN` by every worker left out."""
        for family in self._files.collect():  # type: ignore[no-untyped-call]
            if family.name in (MODEL_READY._name, MODEL_INFO._name):
                family.samples = [s for s in family.samples if s.value != FORGOTTEN]
            yield family


def multiprocess_registry(path: str, workers: WorkerCounts) -> CollectorRegistry:
    """The supervisor's registry: every worker's metrics from ``path``, summed as declared."""
    registry = CollectorRegistry()
    registry.register(_Workers(path))
    registry.register(workers)
    return registry


class _NvmlCollector(Collector):
    """GPU utilisation and memory from NVML, read at scrape time."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        utilization = GaugeMetricFamily(
            GPU_METRICS[0],
            "GPU busy fraction over the last sample period (NVML).",
            labels=["gpu"],
        )
        used = GaugeMetricFamily(GPU_METRICS[1], "GPU memory in use (NVML).", labels=["gpu"])
        total = GaugeMetricFamily(GPU_METRICS[2], "GPU memory (NVML).", labels=["gpu"])
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            utilization.add_metric([str(index)], rates.gpu / 100)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield from (utilization, used, total)


def register_gpu_metrics(registry: CollectorRegistry = REGISTRY) -> bool:
    """Export the GPU gauges when NVML (nvidia-ml-py) works; otherwise they are absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return False
    except Exception as exc:  # not installed, no driver, no device: all mean "no GPU metrics"
        log.info("GPU metrics off: NVML unavailable (%s)", type(exc).__name__)
        return False
    global _nvml
    _nvml = pynvml
    registry.register(_NvmlCollector(pynvml))
    log.info("GPU metrics on: %d device(s) through NVML", pynvml.nvmlDeviceGetCount())
    return True


_nvml: Any = None


def gpu_memory_used(device: int) -> int | None:
    """Bytes in use on ``device`` by NVML, or None without NVML."""
    if _nvml is None:
        return None
    try:
        handle = _nvml.nvmlDeviceGetHandleByIndex(device)
        return int(_nvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # a vanished device or driver error: no figure, not a crash
        return None
