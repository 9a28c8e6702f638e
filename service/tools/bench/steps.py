"""What one served load step is: the server under load, the load, and the row it yields."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLASSIFY_METHOD", "KSERVE_METHOD", "STREAM_METHOD", "ServedRow", "Step", "Target"]

KSERVE_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY_METHOD = "/convserve.v1.Classifier/Classify"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass(frozen=True)
class Target:
    """A server under load and the model the load asks for.

    Attributes:
        address: its gRPC ``host:port``.
        metrics_url: its Prometheus ``/metrics``, read before and after each step.
        model: the model every request names.
        pid: its process on this machine, whose CPU time is read across each step (None for a
            server elsewhere).
    """

    address: str
    metrics_url: str
    model: str
    pid: int | None = None


@dataclass(frozen=True)
class Step:
    """One load step: which request, how many in flight, for how long, from which generator.

    Attributes:
        api: the label the step is reported under.
        method: the gRPC method (``KSERVE_METHOD``, ``CLASSIFY_METHOD`` or ``STREAM_METHOD``).
        payload: the serialised request; the target's model name is written into it.
        concurrency: requests in flight.
        seconds: length of the measured phase.
        connections: TCP connections the requests in flight are spread over.
        generator: ``python`` (:mod:`service.tools.loadgen`) or ``h2load``.
    """

    api: str
    method: str
    payload: bytes
    concurrency: int
    seconds: float
    connections: int = 1
    generator: str = "python"


@dataclass(frozen=True)
class ServedRow:
    """One step of the concurrency sweep."""

    api: str
    concurrency: int
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    generator_cpu_share: float
    errors: int
    compute_ms_per_batch: float
    queue_ms: float
    server_cpu_ms_per_request: float
    connections: int
    generator: str
