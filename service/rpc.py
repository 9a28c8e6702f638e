"""The one place that turns domain errors into gRPC statuses and records request metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from . import metrics
from .errors import ServingError
from .inference import Outcome

__all__ = ["deadline_of", "guarded", "inference_call", "inference_rpc", "rpc"]

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
    metadata = dict(context.invocation_metadata() or ())
    outcome = Outcome(request_id=str(metadata.get("x-request-id", "")))
    started = time.perf_counter()
    code, reason = "OK", ""
    metrics.INFLIGHT.inc()
    try:
        async with guarded(context):
            try:
                yield outcome
            except ServingError as exc:
                code, reason = exc.code.name, exc.message
                raise
            except asyncio.CancelledError:
                code, reason = "CANCELLED", "the client went away"
                raise
            except Exception:
                code, reason = "INTERNAL", "unexpected error (traceback logged)"
                raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.INFLIGHT.dec()
        metrics.REQUESTS.labels(outcome.model, outcome.version, api, code).inc()
        metrics.REQUEST_DURATION.labels(outcome.model, api).observe(elapsed)
        if code != "OK":  # never the tensors or image bytes: only what identifies the request
            log.warning(
                "%s request to %s failed with %s after %.1f ms: %s",
                api,
                outcome.model,
                code,
                elapsed * 1000,
                reason,
                extra={
                    "model": outcome.model,
                    "request_id": outcome.request_id,
                    "api": api,
                    "status": code,
                    "duration_seconds": round(elapsed, 6),
                },
            )


Request = TypeVar("Request")
Reply = TypeVar("Reply")
Servicer = TypeVar("Servicer")
Handler = Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Reply]]


def rpc(method: Handler[Servicer, Request, Reply]) -> Handler[Servicer, Request, Reply]:
    """Decorate a unary RPC: domain errors become statuses (see :func:`guarded`)."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Request, context: grpc.aio.ServicerContext) -> Reply:
        async with guarded(context):
            return await method(self, request, context)
        raise AssertionError("unreachable: guarded() aborted the call")

    return wrapper


def inference_rpc(
    api: str,
) -> Callable[
    [Callable[[Servicer, Request, grpc.aio.ServicerContext, Outcome], Awaitable[Reply]]],
    Handler[Servicer, Request, Reply],
]:
    """Decorate an inference RPC of ``api``: statuses and request metrics.

    The method gets the request's :class:`Outcome` as a fourth argument, to fill in.
    """

    def decorate(
        method: Callable[[Servicer, Request, grpc.aio.ServicerContext, Outcome], Awaitable[Reply]],
    ) -> Handler[Servicer, Request, Reply]:
        @functools.wraps(method)
        async def wrapper(
            self: Servicer, request: Request, context: grpc.aio.ServicerContext
        ) -> Reply:
            async with inference_call(context, api) as outcome:
                return await method(self, request, context, outcome)
            raise AssertionError("unreachable: inference_call() aborted the call")

        return wrapper

    return decorate
