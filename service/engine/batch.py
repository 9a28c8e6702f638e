"""One batch of the batcher: the requests it holds, stacking their inputs, failing them together.

Also what bounds a batch besides ``max_batch_size``, and whose drops the batcher counts:

* A dense twin's batch holds requests of one input shape, and its memory grows with their rows:
  :class:`DenseRows` caps its rows so that the batch's peak memory, by the estimate a
  ClassifyDense plan sizes its own passes with (:func:`dense_row_bytes`), stays within
  ``--dense-memory-bytes``, whichever requests its rows come from.
* A request submitted in parts (a Classify's chunks, a ClassifyDense's passes) is one request to
  its client and in the request metrics: the batcher counts no drop of a part (:func:`parts`),
  the request's owner counts its one drop when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from model_format.map_size import twin_pass_bytes
from service.core.errors import ServingError

__all__ = [
    "BatchObserver",
    "DenseRows",
    "Pending",
    "RunBatch",
    "dense_row_bytes",
    "fail_batch",
    "in_parts",
    "parts",
    "stack_inputs",
]

# Failed batches are the batcher's to report: its logger names them in the server log.
log = logging.getLogger("service.engine.batcher")

RunBatch = Callable[[Mapping[str, np.ndarray], int], Sequence[np.ndarray]]
"""``run(feeds, instance)``: every output for a stacked batch, leading axis = total images."""


class BatchObserver(Protocol):
    """Told about what the batcher does (statistics and metrics)."""

    def batch_done(
        self,
        images: int,
        requests: int,
        input_seconds: float,
        compute_seconds: float,
        output_seconds: float,
    ) -> None:
        """A batch ran and was answered: stacking its inputs, the model, splitting outputs.

        A batch that failed is not reported (as in Triton, it is no inference or execution).
        """

    def queued(self, waited_seconds: float) -> None:
        """A request left the queue for a batch."""

    def dropped(self, reason: str) -> None:
        """A request was dropped before compute: deadline, cancelled, queue_full, draining."""

    def depth(self, images: int) -> None:
        """Images waiting at this moment."""


_PARTS: contextvars.ContextVar[bool] = contextvars.ContextVar("parts", default=False)


@contextlib.contextmanager
def parts() -> Iterator[None]:
    """Submissions in the block (and in tasks started there) are parts of one request.

    The batcher counts no drop of a part (an expired, abandoned or refused chunk): the request's
    owner counts the request's drop once, where it ends, so that a request of many chunks counts
    once, neither once per chunk dropped from a queue nor never when it ends between chunks.
    """
    token = _PARTS.set(True)
    try:
        yield
    finally:
        _PARTS.reset(token)


def in_parts() -> bool:
    """Whether this context submits parts of one request (see :func:`parts`)."""
    return _PARTS.get()


@dataclass(eq=False)
class Pending:
    """One request waiting for its rows; ``part``: of a larger request (see :func:`parts`)."""

    inputs: Mapping[str, np.ndarray]
    count: int
    key: Hashable
    deadline: float | None
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float = field(default_factory=time.monotonic)
    part: bool = field(default_factory=in_parts)


def dense_row_bytes(shape: Sequence[int], bytes_per_pixel: int = 0) -> int:
    """Peak memory of one row ``[C, *size]`` of a dense twin's pass, in bytes.

    The row's float32 input, its copy in the stacked batch, and the network's activations
    (:func:`~model_format.map_size.twin_pass_bytes`; ``bytes_per_pixel`` 0: the estimate).
    """
    channels, *size = shape
    return 4 * channels * math.prod(size) + twin_pass_bytes(1, size, channels, bytes_per_pixel)


class DenseRows:
    """The most rows of one input shape a dense twin's batch takes within ``memory_bytes``.

    Called with a batch's shape key (every input's shape past the batch axis); at least 1, so
    that a request whose own rows are over the budget still runs alone.

    Args:
        memory_bytes: ``--dense-memory-bytes``.
        bytes_per_pixel: ``--dense-bytes-per-pixel`` (0: the estimate).
    """

    def __init__(self, memory_bytes: int, bytes_per_pixel: int = 0) -> None:
        self.memory_bytes = memory_bytes
        self.bytes_per_pixel = bytes_per_pixel

    def __call__(self, key: Hashable) -> int:
        """The most rows of a batch of shape ``key``."""
        assert isinstance(key, tuple)  # the validation's key: a shape per input
        row = sum(dense_row_bytes(shape, self.bytes_per_pixel) for shape in key)
        return max(1, self.memory_bytes // max(row, 1))


def stack_inputs(batch: list[Pending]) -> tuple[dict[str, np.ndarray], int, float]:
    """The batch's feeds, its image count, and the seconds stacking took."""
    stacking = time.perf_counter()
    if len(batch) == 1:
        feeds = dict(batch[0].inputs)
    else:
        feeds = {n: np.concatenate([p.inputs[n] for p in batch]) for n in batch[0].inputs}
    return feeds, sum(p.count for p in batch), time.perf_counter() - stacking


def fail_batch(batch: list[Pending], exc: Exception) -> None:
    """Fail every request of the batch with ``exc`` (logged unless a ServingError).

    As in Triton, a failed batch is no inference or execution in the statistics; each
    request's failure is counted where it finishes (the data plane).
    """
    if not isinstance(exc, ServingError):
        log.exception("batch of %d requests failed in the runtime", len(batch), exc_info=exc)
        exc = ServingError("inference failed inside the runtime")
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
