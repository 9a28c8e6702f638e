"""Per model-version statistics: Triton's ModelStatistics figures and the Prometheus metrics.

One :class:`ModelStats` per served model version is the batcher's observer and the data plane's
record of finished requests, so the KServe statistics extension and ``/metrics`` always agree.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from service.engine import metrics

__all__ = ["BatchDurations", "Duration", "ModelStats"]


@dataclass
class Duration:
    """A count and a total in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` events taking ``seconds`` in all."""
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class BatchDurations:
    """Triton's InferBatchStatistics for one batch size: counts are executions."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Statistics of one served model version (see the module docstring)."""

    model: str
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchDurations] = field(default_factory=lambda: defaultdict(BatchDurations))

    def __post_init__(self) -> None:
        self._queue_seconds = metrics.QUEUE_DURATION.labels(self.model)
        self._compute_seconds = metrics.COMPUTE_DURATION.labels(self.model)
        self._batch_size = metrics.BATCH_SIZE.labels(self.model)
        self._inferences = metrics.INFERENCES.labels(self.model)
        self._batches = metrics.BATCHES.labels(self.model)
        self._depth = metrics.QUEUE_DEPTH.labels(self.model)

    # -- BatchObserver ---------------------------------------------------------------------------
    def batch_done(
        self,
        images: int,
        requests: int,
        input_seconds: float,
        compute_seconds: float,
        output_seconds: float,
    ) -> None:
        """A batch of ``images`` from ``requests`` requests ran.

        As in Triton, the request-level compute figures count requests (each request of a batch
        is charged the batch's time), and the per-batch-size figures count executions.
        """
        self.inference_count += images
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_input.add(input_seconds * requests, requests)
        self.compute_infer.add(compute_seconds * requests, requests)
        self.compute_output.add(output_seconds * requests, requests)
        batch = self.batches[images]
        batch.compute_input.add(input_seconds)
        batch.compute_infer.add(compute_seconds)
        batch.compute_output.add(output_seconds)
        self._compute_seconds.observe(compute_seconds)
        self._batch_size.observe(images)
        self._inferences.inc(images)
        self._batches.inc()

    def queued(self, waited_seconds: float) -> None:
        """A request left the queue after ``waited_seconds``."""
        self.queue.add(waited_seconds)
        self._queue_seconds.observe(waited_seconds)

    def dropped(self, reason: str) -> None:
        """A request was dropped before compute."""
        metrics.DROPPED.labels(self.model, reason).inc()

    def depth(self, images: int) -> None:
        """Images waiting now."""
        self._depth.set(images)

    # -- the data plane --------------------------------------------------------------------------
    def finished(self, ok: bool, seconds: float) -> None:
        """A request that reached this model finished."""
        (self.success if ok else self.fail).add(seconds)
