"""The data plane: one decoded request in, the model's rows for it out, for every API.

Servicers translate protocol messages into :class:`InferenceRequest` and call :meth:`infer`; the
request is looked up, checked, queued with its deadline, and answered from its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import numpy as np

from service.core.errors import DeadlineExceeded, ServingError
from service.core.types import InferenceRequest
from service.engine import metrics
from service.engine.admission import Draining
from service.engine.lifecycle import Lifecycle
from service.engine.metrics import UNKNOWN_MODEL
from service.engine.repository import ModelRepository, ServedModel
from service.engine.validation import check_request

__all__ = ["DEADLINE_SLACK", "DataPlane", "Outcome"]

DEADLINE_SLACK = 0.002
"""A call cancelled this close to its deadline was cancelled by gRPC's deadline timer (whose
clock is not quite the one the deadline was computed on), not by its client."""


@dataclass
class Outcome:
    """What the data plane learned about a request, for the servicer's metrics."""

    model: str = UNKNOWN_MODEL
    version: str = ""
    request_id: str = ""


class DataPlane:
    """See the module docstring."""

    def __init__(self, repository: ModelRepository, lifecycle: Lifecycle | None = None) -> None:
        """Serve ``repository``'s models while ``lifecycle`` accepts work.

        Args:
            repository: the served models.
            lifecycle: the server's; left out, one of its own that never drains.
        """
        self.repository = repository
        self.lifecycle = Lifecycle(repository) if lifecycle is None else lifecycle

    def model(self, name: str, version: str, outcome: Outcome) -> ServedModel:
        """Look a served model up, refusing work the server did not take before its drain.

        A call admitted at the door before the drain began is served even when its lookup
        comes later (its request read, its images decoded meanwhile).
        """
        if not self.lifecycle.admitted():
            self.attribute(outcome, name, version)
            metrics.DROPPED.labels(outcome.model, "draining").inc()
            raise Draining()
        model = self.repository.get(name, version)
        outcome.model, outcome.version = model.name, str(model.version)
        return model

    def attribute(self, outcome: Outcome, name: str, version: str) -> ServedModel | None:
        """Name a refused request's model in its metrics, where that model is served.

        For requests refused before the lookup (undecodable, or while draining); an unknown
        name stays ``_unknown``, so clients cannot add label values.
        """
        with contextlib.suppress(ServingError):
            model = self.repository.get(name, version)
            outcome.model, outcome.version = model.name, str(model.version)
            return model
        return None

    def refused(self, outcome: Outcome, name: str, version: str) -> None:
        """A request to a served model was refused before it reached it (undecodable).

        It counts as a failure in the model's statistics as in its request metrics.
        """
        if (model := self.attribute(outcome, name, version)) is not None:
            model.stats.finished(False, 0.0)

    async def infer(
        self,
        request: InferenceRequest,
        deadline: float | None,
        outcome: Outcome,
        served: ServedModel | None = None,
    ) -> tuple[ServedModel, list[np.ndarray]]:
        """Run ``request`` through its model's batcher.

        Args:
            request: the decoded request.
            deadline: the gRPC deadline on the monotonic clock, if the client set one.
            outcome: filled with the model and version that answered.
            served: the model, when a request already looked it up (a chunk of a larger one):
                no second lookup, so a drain or a reload that began since does not refuse
                the rest of work the server has accepted.

        Returns:
            The model that answered and this request's rows of every output.

        Raises:
            ServingError: unknown model, invalid input, full queue, deadline passed, draining.
        """
        if served is None:
            model = self.model(request.model_name, request.model_version, outcome)
        else:
            model = served
            outcome.model, outcome.version = model.name, str(model.version)
        started = time.monotonic()
        ok = False
        try:
            count, key = check_request(request, model)  # a refusal is a failure in statistics
            timeout_us = request.timeout_us or model.config.batching.default_timeout_microseconds
            if timeout_us:
                own = started + timeout_us / 1e6
                deadline = own if deadline is None else min(deadline, own)
            future = model.batcher.submit(request.inputs, count, key, deadline)
            if future.done():  # a tiny model ran inside submit
                rows = future.result()
            elif deadline is None:
                rows = await future
            else:
                rows = await self._wait(future, deadline)
            ok = True
            return model, rows
        finally:
            model.stats.finished(ok, time.monotonic() - started)

    @staticmethod
    async def _wait(future: asyncio.Future[list[np.ndarray]], deadline: float) -> list[np.ndarray]:
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline - time.monotonic())
        except TimeoutError:
            error = DeadlineExceeded("deadline exceeded before the result was ready")
            if not future.done():  # tells the batcher to drop it as expired, not cancelled
                future.set_exception(error)
                future.exception()
            raise error from None
        except asyncio.CancelledError:
            # At its deadline gRPC cancels the call itself: the batcher drops it as expired.
            if time.monotonic() >= deadline - DEADLINE_SLACK and not future.done():
                future.set_exception(DeadlineExceeded("the deadline passed in the queue"))
                future.exception()
            future.cancel()
            raise
