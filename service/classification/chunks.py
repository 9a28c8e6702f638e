"""More rows than one request may carry, run as several requests through the data plane.

Classify (many images) and ClassifyDense (copies, crops, several scales) hand the data plane
batches larger than a model's ``max_batch_size``. :class:`ChunkedInference` splits them into
chunks of that size and keeps at most ``CHUNKS_IN_FLIGHT`` of one client request queued at a
time, so the request neither fills the model's queue (turning other clients away) nor runs alone
for long: other clients' requests queue between its chunks. A chunk's rows can be built only
when it is its turn (decoded, copied or cropped), so a request's inputs are never all in memory
at once. The first chunk that fails cancels the rest.

Such a request is one request to its client and in ``convserve_requests_total``, so it is one
in ``convserve_dropped_requests_total`` too: its batchers count no drop of a chunk
(:func:`~service.engine.batch.parts`), and :func:`held` counts the request's drop once when it
ends cancelled, past its deadline or refused by a full queue, wherever it was then (decoding,
between chunks, queued or computing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np

from service.core.types import InferenceRequest
from service.engine import metrics
from service.engine.admission import drop_reason
from service.engine.dataplane import DEADLINE_SLACK, DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["CHUNKS_IN_FLIGHT", "ChunkedInference", "held"]


# Enough to fill a few instances' batches back to back, few enough to leave room in the queue
# for other clients.
CHUNKS_IN_FLIGHT = 4


@contextlib.contextmanager
def held(outcome: Outcome, deadline: float | None, *models: ServedModel | None) -> Iterator[None]:
    """Hold each model's batcher open for the block (see BatchQueue.held), and count its drop.

    Every chunk of a request then runs on the versions it started on, even if a reload swaps
    them out meanwhile. A request that leaves the block cancelled (by its client, or by gRPC at
    ``deadline``), past its deadline or refused a chunk's place in a full queue is counted once
    in ``convserve_dropped_requests_total``, under the model ``outcome`` names, as its request
    metrics are (see the module docstring).
    """
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(model.batcher.held())
        try:
            yield
        except BaseException as exc:
            reason = _drop(exc, deadline)
            if reason is not None:
                metrics.DROPPED.labels(outcome.model, reason).inc()
            raise


def _drop(exc: BaseException, deadline: float | None) -> str | None:
    """The drop reason of a request that ended in :func:`held` with ``exc``, or None.

    As the request metrics tell them apart: a cancellation at the deadline is gRPC's, an
    expiry. ``draining`` is counted where the lookup refuses, before any request holds.
    """
    cancelled = isinstance(exc, asyncio.CancelledError)
    if cancelled and deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK:
        return "deadline"
    reason = drop_reason(exc)
    return None if reason == "draining" else reason


class ChunkedInference:
    """One client request's inference, in chunks of each model's batch size.

    Args:
        plane: the data plane every chunk goes through.
        deadline: the client's deadline on the monotonic clock, if it set one.
        outcome: filled with the model and version that answered.
    """

    def __init__(self, plane: DataPlane, deadline: float | None, outcome: Outcome) -> None:
        self._plane = plane
        self._deadline = deadline
        self._outcome = outcome

    async def rows(self, model: ServedModel, batch: np.ndarray) -> np.ndarray:
        """``model``'s first output for every row of ``batch``, in order."""
        step = model.max_batch_size or 1
        if len(batch) <= step:  # awaited in place: a task costs loop turns
            return await self._run(model, batch)

        async def part(start: int, stop: int) -> np.ndarray:
            return batch[start:stop]

        return np.concatenate(await self.stream(model, len(batch), part))

    async def stream(
        self,
        model: ServedModel,
        count: int,
        make: Callable[[int, int], Awaitable[np.ndarray]],
        step: int = 0,
        in_flight: int = CHUNKS_IN_FLIGHT,
    ) -> list[np.ndarray]:
        """``model``'s first output for rows ``0..count``, one array per chunk, in order.

        ``make(start, stop)`` builds a chunk's rows only once a place in flight is free, so a
        request holds the inputs of at most ``in_flight`` chunks (each of ``step`` rows, by
        default the model's batch size) and its next chunk is built while the last ones run.
        The first failure (or the caller's cancellation) cancels the chunks in flight.
        """
        step = step or model.max_batch_size or 1
        slots = asyncio.Semaphore(in_flight)
        tasks: list[asyncio.Task[np.ndarray]] = []

        async def run(rows: np.ndarray) -> np.ndarray:
            try:
                return await self._run(model, rows)
            finally:
                slots.release()

        try:
            for start in range(0, count, step):
                await slots.acquire()
                failed = next(
                    (t for t in tasks if t.done() and not t.cancelled() and t.exception()), None
                )
                if failed is not None:  # no more chunks for a request that has failed
                    slots.release()
                    await failed
                try:
                    rows = await make(start, min(start + step, count))
                except BaseException:
                    slots.release()
                    raise
                tasks.append(asyncio.ensure_future(run(rows)))
                del rows  # held by its task only, so its memory goes when the chunk is done
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

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
