"""Drain markers: where, in gRPC's queue of calls, the calls received before the drain end.

gRPC holds the calls that have arrived for the server to pick them up, one queue per method,
and a busy server picks them up later than they arrived: at SIGTERM it holds many (a server
stopped then cancels them, CANCELLED to their clients, as if they had been lost). So the door
(:meth:`~service.engine.lifecycle.Lifecycle.admit`) does not close for an inference method when
the drain begins, but when a marker does arrive: a call of that method that the server sends to
itself, over its own Unix socket, as the drain begins. It joins the method's queue behind every
call received before it, so every call picked up before it is served, and every call after it
is refused with UNAVAILABLE. The marker itself is answered ABORTED, and counted nowhere. A
marker carries a header with a secret of this process, so no
client can close a door early.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path

import grpc

__all__ = ["ANSWER", "HEADER", "KINDS", "SECRET", "send_markers"]

log = logging.getLogger(__name__)

HEADER = "x-convserve-drain-marker"
SECRET = secrets.token_hex(16)
"""The header's value: this process's own, so that only the server itself sends a marker."""

ANSWER = (grpc.StatusCode.ABORTED, "drain marker")
"""How the server answers a marker: a code no other answer of an inference method has."""

_METHODS = {
    "ModelInfer": "/inference.GRPCInferenceService/ModelInfer",
    "Classify": "/convserve.v1.Classifier/Classify",
    "ClassifyDense": "/convserve.v1.Classifier/ClassifyDense",
}
KINDS = tuple(_METHODS)
"""The kinds of call whose door waits for its marker: the unary inference methods, by the name
of their handler. A stream needs none: once the drain has begun it is refused, or ends."""


async def send_markers(socket: Path, headers: Sequence[tuple[str, str]], timeout: float) -> bool:
    """Send every method's marker over ``socket``; True once each has been picked up.

    ``headers``: those a restricted API group needs (the marker passes the same door as any
    call). False when a marker could not be sent or was not picked up within ``timeout``
    seconds (the caller then closes the doors itself).
    """
    metadata = ((HEADER, SECRET), *headers)
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        calls = [
            channel.unary_unary(path)(b"", metadata=metadata, timeout=timeout, wait_for_ready=True)
            for path in _METHODS.values()
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in results if not _picked_up(r)]
    if failed:
        log.warning("drain markers did not all arrive (%s); closing the doors now", failed[0])
    return not failed


def _picked_up(result: object) -> bool:
    return isinstance(result, grpc.aio.AioRpcError) and (result.code(), result.details()) == ANSWER
