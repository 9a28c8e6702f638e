"""Which HTTP status a failure gets, and the JSON error body KServe v2 and Triton answer with.

Triton's HTTP frontend (``src/http_server.cc``, ``HttpCodeFromError``) maps its error codes as
INTERNAL 500, NOT_FOUND 404, UNAVAILABLE 503, UNSUPPORTED 501 and everything else (invalid
argument, cancelled, unknown, already exists) 400; a full queue is UNAVAILABLE there
("Exceeds maximum queue size"), so 503, as is a drain. This server follows it, and gives the
codes Triton has no counterpart for their own HTTP status: a request too large (tensor elements,
images, dense budgets, a body over ``--max-message-bytes``) 413, and a request whose ``timeout``
passed 504 (Triton answers its queue timeout 503 "Request timeout expired"). Every error body is
``{"error": "<message>"}``.
"""

from __future__ import annotations

import json

import grpc
from aiohttp import web

from service.core.errors import ServingError
from service.engine.admission import QueueFull

__all__ = ["INTERNAL_MESSAGE", "error_response", "status_of"]

INTERNAL_MESSAGE = "internal error (logged by the server)"
"""What a client is told of a fault of the server (never the exception's text)."""

_BY_CODE = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,  # too large; a full queue is 503 (status_of)
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


def status_of(exc: ServingError) -> int:
    """The HTTP status of a domain error (400 for codes Triton has no closer status for)."""
    if isinstance(exc, QueueFull):
        return 503  # Triton's queue-full answer: this replica is busy, retry later
    return _BY_CODE.get(exc.code, 400)


def error_response(status: int, message: str, close: bool = False) -> web.Response:
    """``{"error": message}`` with ``status``; ``close``: end the connection after it."""
    response = web.Response(
        status=status,
        body=json.dumps({"error": message}).encode(),
        content_type="application/json",
    )
    if close:
        response.force_close()
    return response
