"""The one place that turns domain errors into gRPC statuses and records request metrics.

Every inference call is counted in ``convserve_requests_total`` however it ends, including
the calls that end before their request is read: grpc queues calls the server has not picked
up yet, and a call whose deadline passes there, or whose client gives up, is picked up dead.
So an inference method reads its own request (:func:`register` serves it as a stream of one
message, the same on the wire) and counts such a call as DEADLINE_EXCEEDED or CANCELLED.

Each inference call is admitted or refused at the door as the server picks it up
(:meth:`~service.engine.lifecycle.Lifecycle.admit`): once the drain has begun, and its method's
drain marker has arrived (:mod:`service.wire.drain_markers`), a new call is refused with
UNAVAILABLE; a call admitted before is served to its end.

What is recorded of each call, and how refusals are summed up in the log, is
:mod:`service.wire.accounting`'s, shared with the REST port; a fault of the server is logged
here, one ERROR line with its traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from service.core.errors import InvalidArgument, ServingError
from service.engine import metrics
from service.engine.dataplane import DEADLINE_SLACK, Outcome
from service.engine.lifecycle import Lifecycle
from service.wire import drain_markers
from service.wire.accounting import OK, REFUSALS, Ending, count_unattributed, ending_of, record

__all__ = [
    "CALL_QUEUE_OPTIONS",
    "REFUSALS",
    "Serving",
    "Undecodable",
    "counted",
    "deadline_of",
    "inference_rpc",
    "register",
    "rpc",
]

log = logging.getLogger(__name__)

PROTOCOL = "grpc"
"""The ``protocol`` label of the requests counted here."""

CALL_QUEUE_OPTIONS = [
    ("grpc.server.max_pending_requests", 1 << 16),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 16),
]
"""Server options: the calls grpc holds for the server to pick up, before it refuses some.

grpc's defaults (1,000, then a random share up to 3,000) cancel calls beyond them with
CANCELLED, a status clients do not retry, before the server sees them: uncounted. With these,
every call reaches the server, which counts it and answers it (or refuses it) itself.
"""


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


class _Unread:
    """Stands for the request an inference method reads itself (see :func:`register`)."""


_UNREAD = _Unread()


def _reading_itself(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler``, a unary inference method, served as a stream of one request it reads.

    grpc reads a unary call's request before its handler starts, and drops a call whose request
    cannot be read without a word; a stream's handler starts first.
    """
    method = handler.unary_unary

    async def reading(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await method(_UNREAD, context)

    return grpc.stream_unary_rpc_method_handler(
        reading,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def register(add: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as ``add`` (a generated ``add_*Servicer_to_server``) would.

    Its request parsers hand an unparsable message to the handler as :class:`Undecodable`
    instead of failing inside grpc, and its inference methods read their own requests.
    """

    class Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass  # rebuilt below from the method table

        def add_registered_method_handlers(
            self, service: str, table: dict[str, grpc.RpcMethodHandler]
        ) -> None:
            tolerant = {}
            for name, handler in table.items():
                handler = handler._replace(
                    request_deserializer=_tolerant(name, handler.request_deserializer)
                )
                if getattr(handler.unary_unary, "reads_own_request", False):
                    handler = _reading_itself(handler)
                tolerant[name] = handler
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
        code, message = exc.code, exc.message
    else:
        log.exception("unexpected error while handling a request", exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, "internal error (logged by the server)"
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # the status cannot be sent: the call has ended, its client is gone
        raise asyncio.CancelledError() from None
    raise AssertionError("unreachable: abort() raises")


def _headers(context: grpc.aio.ServicerContext) -> tuple[str, bool]:
    """The call's request id ("" when none), and whether it is this server's drain marker."""
    request_id, marker = "", False
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            request_id = str(value)
        elif key == drain_markers.HEADER:
            marker = value == drain_markers.SECRET
    return request_id, marker


def _past_deadline(context: grpc.aio.ServicerContext | None, deadline: float | None) -> bool:
    """Whether the request's deadline has passed (so a cancellation is gRPC's, at it)."""
    if deadline is None and context is not None:
        deadline = deadline_of(context)
    return deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK


def _ending(
    exc: BaseException,
    context: grpc.aio.ServicerContext | None = None,
    deadline: float | None = None,
) -> Ending:
    """How a request that raised ``exc`` ended; ``deadline``: its own, where the caller knows it."""
    if isinstance(exc, grpc.aio.AbortError) and context is not None:  # aborted by the method
        status = context.code()
        code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        return Ending(code, "aborted by the handler")
    past = isinstance(exc, asyncio.CancelledError) and _past_deadline(context, deadline)
    return ending_of(exc, past)


T = TypeVar("T")


async def counted(
    api: str, outcome: Outcome, work: Awaitable[T], deadline: float | None = None
) -> T:
    """Await one request that is not an RPC of its own (a stream's message), counted as one.

    The same request metrics as :func:`inference_rpc`; errors pass through unchanged.
    ``deadline`` (monotonic) tells a cancellation at the deadline from a client leaving.
    """
    started = time.perf_counter()
    ending = OK
    metrics.INFLIGHT.inc()
    try:
        return await work
    except (Exception, asyncio.CancelledError) as exc:
        ending = _ending(exc, deadline=deadline)
        raise
    finally:
        record(outcome, api, PROTOCOL, ending, time.perf_counter() - started)


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


async def _read(context: grpc.aio.ServicerContext) -> Any:
    """The one request of a call served as a stream (see :func:`register`).

    Raises:
        asyncio.CancelledError: the call ended before its request arrived.
    """
    request = await context.read()
    if request is grpc.aio.EOF:  # as grpc does for a unary call: the call is gone
        raise asyncio.CancelledError()
    return request


class Serving(Protocol):
    """A servicer of inference RPCs: the lifecycle of its server admits each call."""

    @property
    def lifecycle(self) -> Lifecycle:
        """The server's lifecycle."""
        ...


Inferring = TypeVar("Inferring", bound=Serving)


def inference_rpc(
    api: str,
) -> Callable[
    [Callable[[Inferring, Request, grpc.aio.ServicerContext, Outcome], Awaitable[Reply]]],
    Handler[Inferring, Request, Reply],
]:
    """Decorate an inference RPC of ``api``: the drain's door, statuses and request metrics.

    The method gets the request's :class:`Outcome` as a fourth argument, to fill in. Served
    through :func:`register`, the call is counted from the moment the server picks it up, and
    admitted or refused then (a drain marker closes the door for its kind: see
    :mod:`service.wire.drain_markers`): a call refused because the drain has begun still has its
    request read, so that the data plane names its model in the refusal's metrics.
    """

    def decorate(
        method: Callable[[Inferring, Request, grpc.aio.ServicerContext, Outcome], Awaitable[Reply]],
    ) -> Handler[Inferring, Request, Reply]:
        kind = method.__name__  # the door's kind of call (see service.wire.drain_markers)

        @functools.wraps(method)
        async def wrapper(
            self: Inferring, request: Any, context: grpc.aio.ServicerContext
        ) -> Reply:
            # The hot path of every inference: plain try/except, no context managers (two
            # nested async ones cost more than the rest of this wrapper).
            request_id, marker = _headers(context)
            lifecycle = self.lifecycle
            if marker:  # every call of this kind received before the drain has been admitted
                lifecycle.caught_up(kind)
                await context.abort(*drain_markers.ANSWER)
            outcome = Outcome(request_id=request_id)
            started = time.perf_counter()
            ending = OK
            taken = lifecycle.admit(kind)
            metrics.INFLIGHT.inc()
            try:
                if request is _UNREAD:
                    request = await _read(context)
                if isinstance(request, Undecodable):
                    raise request.error()
                return await method(self, request, context, outcome)
            except (Exception, asyncio.CancelledError) as exc:
                ending = _ending(exc, context)
                if isinstance(exc, (asyncio.CancelledError, grpc.aio.AbortError)):
                    raise
                await _abort(context, exc)
            finally:
                if taken:
                    lifecycle.release()
                count_unattributed(outcome, ending)  # ended before its request was read, say
                record(outcome, api, PROTOCOL, ending, time.perf_counter() - started)

        wrapper.reads_own_request = True  # type: ignore[attr-defined]
        return wrapper

    return decorate
