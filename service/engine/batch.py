"""One batch of the batcher: the requests it holds, stacking their inputs, failing them together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.core.errors import ServingError

__all__ = ["BatchObserver", "Pending", "RunBatch", "fail_batch", "stack_inputs"]

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


@dataclass(eq=False)
class Pending:
    """One request waiting for its rows."""

    inputs: Mapping[str, np.ndarray]
    count: int
    key: Hashable
    deadline: float | None
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float = field(default_factory=time.monotonic)


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
