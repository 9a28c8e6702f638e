"""The one place that turns domain errors into gRPC statuses and records request metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from . import metrics
from .errors import ServingError
from .inference import Outcome

__all__ = ["deadline_of", "guarded", "inference_call"]

log = logging.getLogger(__name__)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the monotonic clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@asynccontextmanager
async def guarded(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Abort with a ServingError's code and message; anything else is a logged INTERNAL."""
    try:
        yield
    except ServingError as exc:
        await context.abort(exc.code, exc.message)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:
        log.exception("unexpected error while handling a request")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")


@asynccontextmanager
async def inference_call(
    context: grpc.aio.ServicerContext,
    api: str,
) -> AsyncIterator[Outcome]:
    """Like :func:`guarded`, and counts the request by model, version, API and status code."""
    outcome = Outcome()
    started = time.perf_counter()
    code = "OK"
    metrics.INFLIGHT.inc()
    try:
        async with guarded(context):
            try:
                yield outcome
            except ServingError as exc:
                code = exc.code.name
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                raise
    finally:
        metrics.INFLIGHT.dec()
        metrics.REQUESTS.labels(outcome.model, outcome.version, api, code).inc()
        metrics.REQUEST_DURATION.labels(outcome.model, api).observe(time.perf_counter() - started)
