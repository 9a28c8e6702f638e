"""Every readiness answer of a running server, compared with what it should be.

The answers: ServerReady, the health service's "" and per-model statuses, ModelReady, each
model's served versions and batch size, and the ``convserve_model_ready`` and
``convserve_model_load_failures_total`` series scraped from /metrics. With ``--workers`` the
gRPC answers are asked over several connections, so that every worker is asked.
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
DEFAULT_BATCH = 32  # the server's --max-batch-size, for a config.json that names none


@dataclass
class Expected:
    """What the server should be serving.

    Attributes:
        served: model folder -> the version it serves (the models meant to be served).
        dense: model folders that have a ``_dense`` twin.
        failed: folders whose first load failed, not unloaded since: a 0 series, no version.
        failures: failed loads counted since the server started, by folder.
        batch: model folder -> its served max_batch_size.
    """

    served: dict[str, int] = field(default_factory=dict)
    dense: frozenset[str] = frozenset()
    failed: set[str] = field(default_factory=set)
    failures: Counter[str] = field(default_factory=Counter)
    batch: dict[str, int] = field(default_factory=dict)

    def ready(self, name: str) -> bool:
        logical = name.removesuffix("_dense")
        return logical in self.served and (name == logical or logical in self.dense)

    def series(self, name: str) -> dict[str, float]:
        """The ``convserve_model_ready`` series of served name ``name``: version -> value."""
        logical = name.removesuffix("_dense")
        if self.ready(name):
            return {str(self.served[logical]): 1.0}
        if name in self.failed:
            return {"": 0.0}  # a failed first load: nothing serves it
        return {}  # never loaded, or unloaded: no series at all


class Probe:
    """Asks a server every readiness question over ``connections`` connections."""

    def __init__(self, address: str, metrics_url: str, connections: int = 1) -> None:
        self.metrics_url = metrics_url
        self.channels = [
            grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def problems(self, expected: Expected, names: list[str]) -> list[str]:
        """Every disagreement between the server's answers and ``expected``."""
        found = []
        for number, channel in enumerate(self.channels):
            found += [f"connection {number}: {p}" for p in _answers(channel, expected, names)]
        found += _metrics(self.metrics_url, expected, names)
        return found

    def settle(self, expected: Expected, names: list[str], wait: float) -> list[str]:
        """:meth:`problems` once none are left, or after ``wait`` seconds (0: at once)."""
        give_up = time.monotonic() + wait
        while True:
            found = self.problems(expected, names)
            if not found or time.monotonic() >= give_up:
                return found
            time.sleep(0.05)


def health_status(health: health_pb2_grpc.HealthStub, name: str) -> int | None:
    try:
        return int(health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:  # never served: unknown to health
            return None
        raise


def _answers(channel: grpc.Channel, expected: Expected, names: list[str]) -> list[str]:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    found = []
    ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    overall = health_status(health, "")
    # Every model meant to be served is served: ready, and "" says the same.
    if not ready or overall != SERVING:
        found.append(f"ServerReady {ready}, health '' {overall}")
    for name in names:
        should = expected.ready(name)
        model_ready = stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
        status = health_status(health, name)
        if model_ready != should or (status == SERVING) != should:
            found.append(f"{name}: ModelReady {model_ready}, health {status}, expected {should}")
        if should and model_ready:
            logical = name.removesuffix("_dense")
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
            if list(metadata.versions) != [str(expected.served[logical])]:
                found.append(f"{name}: versions {list(metadata.versions)}")
            if name == logical and logical in expected.batch:
                config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10).config
                if config.max_batch_size != expected.batch[logical]:
                    found.append(f"{name}: max_batch_size {config.max_batch_size}")
    return found


def scrape(metrics_url: str) -> dict[str, dict[tuple[str, str], float]]:
    """metric name -> {(model, version): value} (version "" where it has none)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found: dict[str, dict[tuple[str, str], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "model" in sample.labels:
                key = (sample.labels["model"], sample.labels.get("version", ""))
                found.setdefault(sample.name, {})[key] = sample.value
    return found


def _metrics(metrics_url: str, expected: Expected, names: list[str]) -> list[str]:
    samples = scrape(metrics_url)
    ready = samples.get("convserve_model_ready", {})
    found = []
    for name in names:
        series = {version: value for (model, version), value in ready.items() if model == name}
        if series != expected.series(name):
            found.append(
                f"convserve_model_ready {name}: {series}, expected {expected.series(name)}"
            )
    failures = {
        m: v for (m, _), v in samples.get("convserve_model_load_failures_total", {}).items()
    }
    wanted = {m: float(n) for m, n in expected.failures.items() if n}
    if {m: v for m, v in failures.items() if v} != wanted:
        found.append(f"load failures {failures}, expected {wanted}")
    return found
