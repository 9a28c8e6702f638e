"""Request accounting that every protocol shares: how a request ended, its metrics, its log line.

Every inference request, whichever port it came in on, is counted in
``convserve_requests_total`` and ``convserve_request_duration_seconds`` by model, API and
``protocol`` (``grpc`` or ``http``), its ``code`` a gRPC status name on both protocols so that
one query covers them. Refusals under load and requests their clients gave up on are counted,
and logged as one summary line every few seconds (:data:`REFUSALS`); other failures are logged
one WARNING line each.

The protocol layers (:mod:`service.wire.rpc` for gRPC, :mod:`service.wire.http` for REST) decide
when a request begins and ends; this module only records it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from dataclasses import dataclass
from typing import Any

from service.core.errors import DeadlineExceeded, ServingError
from service.core.logs import RefusalSummary
from service.engine import metrics
from service.engine.admission import drop_reason
from service.engine.dataplane import Outcome
from service.engine.metrics import UNKNOWN_MODEL

__all__ = [
    "LEFT",
    "OK",
    "REFUSALS",
    "Ending",
    "child",
    "count_unattributed",
    "ending_of",
    "record",
]

log = logging.getLogger(__name__)

REFUSALS = RefusalSummary(log)
"""The refusal summary of this process's requests; its last line is written at exit."""
atexit.register(REFUSALS.flush)

_CHILDREN: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set.

    labels() takes a lock and builds a key on every call, on the hot path of every request.
    """
    found = _CHILDREN.get((metric, labels))
    if found is None:
        found = _CHILDREN[(metric, labels)] = metric.labels(*labels)
    return found


@dataclass
class Ending:
    """How a request ended: its status code, why (for the log), and its drop reason, if any.

    ``code`` is a gRPC status name (``OK``, ``INVALID_ARGUMENT``...) for every protocol.
    """

    code: str = "OK"
    reason: str = ""
    dropped: str | None = None


OK = Ending()
"""A request answered."""
LEFT = ("cancelled", "deadline")
"""Drop reasons that no batcher or data plane counts for the protocol layer (see
:func:`count_unattributed`)."""


def ending_of(exc: BaseException, past_deadline: bool = False) -> Ending:
    """How a request that raised ``exc`` ended.

    ``past_deadline``: the request's deadline had passed when it raised, so a cancellation is
    the deadline's (gRPC's timer), not its client's.
    """
    if isinstance(exc, asyncio.CancelledError) and past_deadline:
        exc = DeadlineExceeded("the deadline passed before the answer")
    if isinstance(exc, ServingError):
        return Ending(exc.code.name, exc.message, drop_reason(exc))
    if isinstance(exc, asyncio.CancelledError):
        return Ending("CANCELLED", "the client went away", "cancelled")
    return Ending("INTERNAL", "unexpected error (traceback logged)")


def count_unattributed(outcome: Outcome, ending: Ending) -> None:
    """Count a drop of a request that ended before its model was known (its request unread).

    No batcher or data plane saw it, so none counted it in ``convserve_dropped_requests_total``.
    """
    if ending.dropped in LEFT and outcome.model == UNKNOWN_MODEL:
        child(metrics.DROPPED, UNKNOWN_MODEL, ending.dropped).inc()


def record(outcome: Outcome, api: str, protocol: str, ending: Ending, elapsed: float) -> None:
    """Count a finished request by model, version, API, status and protocol; log a failure.

    The caller raised ``convserve_inflight_requests`` when the request began; this lowers it.
    """
    metrics.INFLIGHT.dec()
    child(metrics.REQUESTS, outcome.model, outcome.version, api, ending.code, protocol).inc()
    child(metrics.REQUEST_DURATION, outcome.model, api, protocol).observe(elapsed)
    if ending.code == "OK":
        return
    if ending.dropped is not None:
        REFUSALS.count(ending.dropped)
        return
    # Never the tensors or image bytes: only what identifies the request.
    log.warning(
        "%s request to %s over %s failed with %s after %.1f ms: %s",
        api,
        outcome.model,
        protocol,
        ending.code,
        elapsed * 1000,
        ending.reason,
        extra={
            "model": outcome.model,
            "request_id": outcome.request_id,
            "api": api,
            "status": ending.code,
            "duration_seconds": round(elapsed, 6),
        },
    )
