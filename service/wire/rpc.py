"""The one place that turns domain errors into gRPC statuses and records request metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from service.core.errors import InvalidArgument, ServingError
from service.engine import metrics
from service.engine.dataplane import Outcome

__all__ = ["Undecodable", "counted", "deadline_of", "inference_rpc", "register", "rpc"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse, handed to its handler in its place.

    Left to grpc, such a message ends the call with UNKNOWN and a message naming a Python
    exception class, logs grpc's own traceback, and passes no metrics; on a stream, grpc ends
    the stream and the messages after it are lost. Handlers refuse it with INVALID_ARGUMENT (a
    stream's in-band error, the stream going on).
    """

    method: str
    reason: str

    def error(self) -> InvalidArgument:
        """What the client is told."""
        return InvalidArgument(f"the {self.method} request does not parse: {self.reason}")


def _tolerant(method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(method, str(exc))

    return deserialize


def register(add: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as ``add`` (a generated ``add_*Servicer_to_server``) would.

    Its request parsers hand an unparsable message to the handler as :class:`Undecodable`
    instead of failing inside grpc.
    """

    class Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass  # rebuilt below from the method table

        def add_registered_method_handlers(
            self, service: str, table: dict[str, grpc.RpcMethodHandler]
        ) -> None:
            tolerant = {
                name: handler._replace(
                    request_deserializer=_tolerant(name, handler.request_deserializer)
                )
                for name, handler in table.items()
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, tolerant),)
            )
            server.add_registered_method_handlers(service, tolerant)

    add(servicer, Capture())


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the monotonic clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Abort with a ServingError's code and message; anything else is a logged INTERNAL."""
    if isinstance(exc, ServingError):
        await context.abort(exc.code, exc.message)
    else:
        log.exception("unexpected error while handling a request", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")
    raise AssertionError("unreachable: abort() raises")


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return ""


_CHILDREN: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set.

    labels() takes a lock and builds a key on every call: a few microseconds a request.
    """
    child = _CHILDREN.get((metric, labels))
    if child is None:
        child = _CHILDREN[(metric, labels)] = metric.labels(*labels)
    return child


def _record(outcome: Outcome, api: str, code: str, reason: str, elapsed: float) -> None:
    """Count a finished request by model, version, API and status, and log a failure."""
    metrics.INFLIGHT.dec()
    _child(metrics.REQUESTS, outcome.model, outcome.version, api, code).inc()
    _child(metrics.REQUEST_DURATION, outcome.model, api).observe(elapsed)
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


T = TypeVar("T")


def _status_of(
    exc: BaseException, context: grpc.aio.ServicerContext | None = None
) -> tuple[str, str]:
    """The status code name and the reason a failed request is counted under."""
    if isinstance(exc, ServingError):
        return exc.code.name, exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED", "the client went away"
    if isinstance(exc, grpc.aio.AbortError) and context is not None:  # aborted by the method
        status = context.code()
        code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        return code, "aborted by the handler"
    return "INTERNAL", "unexpected error (traceback logged)"


async def counted(api: str, outcome: Outcome, work: Awaitable[T]) -> T:
    """Await one request that is not an RPC of its own (a stream's message), counted as one.

    The same request metrics as :func:`inference_rpc`; errors pass through unchanged.
    """
    started = time.perf_counter()
    code, reason = "OK", ""
    metrics.INFLIGHT.inc()
    try:
        return await work
    except (Exception, asyncio.CancelledError) as exc:
        code, reason = _status_of(exc)
        raise
    finally:
        _record(outcome, api, code, reason, time.perf_counter() - started)


Request = TypeVar("Request")
Reply = TypeVar("Reply")
Servicer = TypeVar("Servicer")
Handler = Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Reply]]


def rpc(method: Handler[Servicer, Request, Reply]) -> Handler[Servicer, Request, Reply]:
    """Decorate a unary RPC: domain errors become statuses (see :func:`_abort`)."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Request, context: grpc.aio.ServicerContext) -> Reply:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

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
            # The hot path of every inference: plain try/except, no context managers (two
            # nested async ones cost tens of microseconds a request).
            outcome = Outcome(request_id=_request_id(context))
            started = time.perf_counter()
            code, reason = "OK", ""
            metrics.INFLIGHT.inc()
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                return await method(self, request, context, outcome)
            except (Exception, asyncio.CancelledError) as exc:
                code, reason = _status_of(exc, context)
                if isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError)):
                    raise
                await _abort(context, exc)
            finally:
                _record(outcome, api, code, reason, time.perf_counter() - started)

        return wrapper

    return decorate
