"""Where REST routes are added, with what every route shares: restriction, errors, accounting.

Each route names the RPC it is the REST form of (``KSERVE + "ModelInfer"``), and so its
restricted API group (:func:`service.wire.restrictions.group_of`): with
``--http-restricted-api`` a request in a restricted group without its header is answered 403
``{"error": "This API is restricted, expecting header '<key>'"}``, as Triton answers, before
its body is read, and counted in ``convserve_restricted_refusals_total{group}``.

An inference route (:meth:`Routes.inference`) is admitted or refused at the server's door
(:meth:`~service.engine.lifecycle.Lifecycle.admit`, kind ``http``): once the drain has begun a
new request is answered 503 and its connection closed, while requests admitted before are
served to their end. Each is counted as gRPC's are (:mod:`service.wire.accounting`, protocol
``http``), however it ends. Any failure becomes the JSON error body with its status
(:mod:`.statuses`); a fault of the server is logged with its traceback and answered 500 with
a message that quotes nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from service.core.errors import ResourceExhausted, ServingError
from service.core.settings import Restriction
from service.engine import metrics
from service.engine.dataplane import DataPlane, Outcome
from service.engine.model_control import ModelControl
from service.wire.accounting import OK, count_unattributed, ending_of, record
from service.wire.http.statuses import INTERNAL_MESSAGE, error_response, status_of
from service.wire.restrictions import group_of
from service.wire.siblings import Siblings

__all__ = [
    "PROTOCOL",
    "Handler",
    "HttpParts",
    "InferenceHandler",
    "Routes",
    "errors",
    "read_body",
]

log = logging.getLogger(__name__)

PROTOCOL = "http"
"""The ``protocol`` label of the requests counted here."""
KIND = "http"
"""The door's kind of call for REST inference: refused as soon as the drain begins."""
REQUEST_ID = "x-request-id"
"""The header that names a request in the log, as on the gRPC port (a body's ``id`` wins)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
InferenceHandler = Callable[[web.Request, Outcome], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HttpParts:
    """What the REST routes serve from.

    Attributes:
        plane: the data plane (and through it the repository and the lifecycle).
        control: which load and unload requests are served.
        siblings: the other workers of ``serve --workers N``, or None.
        max_elements: most elements of one request tensor.
        max_body: most bytes of one request body (``--max-message-bytes``).
        restrictions: the ``--http-restricted-api`` entries.
    """

    plane: DataPlane
    control: ModelControl
    siblings: Siblings | None
    max_elements: int
    max_body: int
    restrictions: Sequence[Restriction] = ()


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, refused when it is larger than ``limit`` bytes (413).

    Raises:
        ResourceExhausted: the body (by its Content-Length, or as read) is over ``limit``.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(length, limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body, counted as it came
        raise _too_large(None, limit) from None


def _too_large(length: int | None, limit: int) -> ResourceExhausted:
    size = "" if length is None else f" of {length} bytes"
    return ResourceExhausted(
        f"the request body{size} is larger than the server accepts ({limit} bytes; "
        "--max-message-bytes)"
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure outside an inference route as JSON: no HTML, no traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:  # no such route or method, from the router
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        return error_response(exc.status, message)
    except ServingError as exc:
        return error_response(status_of(exc), exc.message)
    except Exception:
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return error_response(500, INTERNAL_MESSAGE)


class Routes:
    """The application's routes; see the module docstring.

    Args:
        app: the aiohttp application.
        parts: what the routes serve from.
    """

    def __init__(self, app: web.Application, parts: HttpParts) -> None:
        self.app = app
        self.parts = parts
        self._restricted = {
            group: restriction for restriction in parts.restrictions for group in restriction.groups
        }

    def add(self, method: str, path: str, handler: Handler, rpc: str) -> None:
        """Serve ``method path`` with ``handler``, restricted as RPC ``rpc``'s group."""
        self.app.router.add_route(method, path, self._guarded(handler, rpc))

    def inference(self, path: str, handler: InferenceHandler, api: str, rpc: str) -> None:
        """Serve ``POST path`` as an inference of ``api`` (``kserve``, ``classify``...).

        ``handler`` gets the request and its :class:`Outcome` to fill in (the model that
        answered); the route admits, counts and answers failures (see the module docstring).
        A route whose path names ``{model}`` (and ``{version}``) has a refused request's model
        named in its metrics.
        """
        lifecycle = self.parts.plane.lifecycle
        plane = self.parts.plane

        async def serve(request: web.Request) -> web.StreamResponse:
            outcome = Outcome(request_id=request.headers.get(REQUEST_ID, ""))
            started = time.perf_counter()
            ending = OK
            taken = lifecycle.admit(KIND)
            metrics.INFLIGHT.inc()
            try:
                if not taken:  # refused at the door: Draining, with the model in the metrics
                    info = request.match_info
                    plane.model(info.get("model", ""), info.get("version", ""), outcome)
                return await handler(request, outcome)
            except asyncio.CancelledError as exc:
                ending = ending_of(exc)
                raise
            except Exception as exc:
                ending = ending_of(exc)
                return self._failure(exc)
            finally:
                if taken:
                    lifecycle.release()
                count_unattributed(outcome, ending)
                record(outcome, api, PROTOCOL, ending, time.perf_counter() - started)

        self.add("POST", path, serve, rpc)

    def _failure(self, exc: Exception) -> web.Response:
        """The JSON answer to a failed inference; while draining, the connection then closes."""
        closing = not self.parts.plane.lifecycle.accepts_work()
        if isinstance(exc, ServingError):
            return error_response(status_of(exc), exc.message, close=closing)
        log.exception("unexpected error while handling an HTTP inference", exc_info=exc)
        return error_response(500, INTERNAL_MESSAGE, close=closing)

    def _guarded(self, handler: Handler, rpc: str) -> Handler:
        """``handler`` behind its group's restriction, or as it is where none applies."""
        group = group_of(rpc)
        restriction = None if group is None else self._restricted.get(group)
        if group is None or restriction is None:
            return handler
        header, value, refused = restriction.header, restriction.value, group

        async def guarded(request: web.Request) -> web.StreamResponse:
            if request.headers.get(header) != value:
                metrics.RESTRICTED_REFUSALS.labels(refused).inc()
                return error_response(403, f"This API is restricted, expecting header '{header}'")
            return await handler(request)

        return guarded
