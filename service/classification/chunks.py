"""More rows than one request may carry, run as several requests through the data plane.

Classify (many images) and ClassifyDense (copies, crops, several scales) hand the data plane
batches larger than a model's ``max_batch_size``. :class:`ChunkedInference` splits them into
chunks of that size and keeps at most ``CHUNKS_IN_FLIGHT`` of one client request queued at a
time, so the request neither fills the model's queue (turning other clients away) nor runs alone
for long; the first chunk that fails cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from service.core.types import InferenceRequest
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["CHUNKS_IN_FLIGHT", "ChunkedInference", "all_of", "held"]

T = TypeVar("T")

# Enough to fill a few instances' batches back to back, few enough to leave room in the queue
# for other clients.
CHUNKS_IN_FLIGHT = 4


@contextlib.contextmanager
def held(*models: ServedModel | None) -> Iterator[None]:
    """Hold each model's batcher open for the block (see BatchQueue.held).

    Every chunk of a request then runs on the versions it started on, even if a reload swaps
    them out meanwhile.
    """
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(model.batcher.held())
        yield


async def all_of(awaitables: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result in order; the first failure (or the caller's cancellation) cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class ChunkedInference:
    """One client request's inference, in chunks of each model's batch size.

    Args:
        plane: the data plane every chunk goes through.
        deadline: the client's deadline on the monotonic clock, if it set one.
        outcome: filled with the model and version that answered.
        shared: one budget of ``CHUNKS_IN_FLIGHT`` for every :meth:`rows` call (every scale of
            a ClassifyDense); otherwise each call has its own.
    """

    def __init__(
        self, plane: DataPlane, deadline: float | None, outcome: Outcome, *, shared: bool = False
    ) -> None:
        self._plane = plane
        self._deadline = deadline
        self._outcome = outcome
        self._slots = asyncio.Semaphore(CHUNKS_IN_FLIGHT) if shared else None

    async def rows(self, model: ServedModel, batch: np.ndarray) -> np.ndarray:
        """``model``'s first output for every row of ``batch``, in order."""
        step = model.max_batch_size or 1
        if len(batch) <= step and self._slots is None:  # awaited in place: a task costs loop turns
            return await self._run(model, batch)
        slots = self._slots or asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def chunk(start: int) -> np.ndarray:
            async with slots:
                return await self._run(model, batch[start : start + step])

        return np.concatenate(await all_of([chunk(i) for i in range(0, len(batch), step)]))

    async def _run(self, model: ServedModel, batch: np.ndarray) -> np.ndarray:
        spec = model.inputs[0]
        request = InferenceRequest(
            model.name, str(model.version), "", {spec.name: batch.astype(spec.dtype, copy=False)}
        )
        # served=model: no second lookup, so a drain or a reload that began since the request
        # was accepted does not refuse its remaining chunks.
        _served, rows = await self._plane.infer(
            request, self._deadline, self._outcome, served=model
        )
        return rows[0]
