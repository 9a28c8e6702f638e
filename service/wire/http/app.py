"""The REST front door: an aiohttp application on the server's own event loop.

aiohttp's server runs on the loop grpc.aio runs on (uvloop), in the same process, with no thread
of its own: a REST request and a gRPC one reach the same data plane, batcher and metrics, and
can share a batch. The composition root binds the socket (the port, ``SO_REUSEPORT`` among
workers, TLS) and hands it over; this module serves it (:class:`HttpServer`).

A request that is not HTTP at all (a wrong Content-Length leaves bytes that parse as no request,
say) is answered by aiohttp's own parser, 400 with a line of text, and its connection closed;
it is logged as one WARNING line (:class:`_ClientFraming`), not as a fault with a traceback.

The routes: KServe v2 and Triton's extensions (:mod:`.kserve_routes`), plus any set a caller
adds: a ``RouteSet`` is a function that receives the :class:`~.routes.Routes` and adds its own
through :meth:`~.routes.Routes.add` and :meth:`~.routes.Routes.inference`, which give them the
restriction, drain, accounting and error answers every route has.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service.wire.http.kserve_routes import add_kserve_routes
from service.wire.http.routes import HttpParts, Routes, errors

__all__ = ["HttpServer", "RouteSet", "build_application"]

log = logging.getLogger(__name__)

_MAX_REASON = 200  # characters of the parser's reason (it may quote the client's bytes)


class _ClientFraming(logging.Filter):
    """aiohttp's report of a malformed HTTP message as one WARNING line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = " ".join(str(error.message).split())[:_MAX_REASON]
            record.msg, record.args = "%s: %s %s", (record.getMessage(), error.code, reason)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_CONNECTIONS = logging.getLogger(f"{__name__}.connections")
"""Where aiohttp reports what happens on the HTTP port's connections."""
_CONNECTIONS.addFilter(_ClientFraming())

RouteSet = Callable[[Routes], None]
"""Adds a set of routes (see the module docstring)."""


def build_application(parts: HttpParts, extra: Sequence[RouteSet] = ()) -> web.Application:
    """The aiohttp application: KServe v2's routes and ``extra``'s, errors answered as JSON.

    ``client_max_size`` is ``parts.max_body``: a larger body is refused with 413 as it is read.
    """
    app = web.Application(middlewares=[errors], client_max_size=parts.max_body)
    routes = Routes(app, parts)
    add_kserve_routes(routes)
    for add in extra:
        add(routes)
    return app


class HttpServer:
    """Serves an application on a bound socket, on the running event loop.

    Args:
        app: what to serve (:func:`build_application`).
        closing_seconds: at :meth:`stop`, how long answers still being written may take.
    """

    def __init__(self, app: web.Application, closing_seconds: float) -> None:
        # No access log: a line per request costs more than the rest of a small request.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=closing_seconds,
            logger=_CONNECTIONS,
        )
        self._started = False

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> int:
        """Listen on ``sock`` (bound, not yet listening); returns its port."""
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, ssl_context=tls, backlog=1024)
        await site.start()
        self._started = True
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every connection once its answer is written.

        The drain has already waited for every admitted inference; what is left are idle
        keep-alive connections and answers being written.
        """
        if self._started:
            self._started = False
            await self._runner.cleanup()
