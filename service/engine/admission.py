"""The door of one model version: a request that cannot start within the queue bound is refused.

A model's ``max_queue_size`` bounds the requests waiting for it, wherever they wait: in the
batcher's queue, and on their way there, from the moment a request holds the model version
(:meth:`~service.engine.batcher.BatchQueue.held`, right after its lookup) until its first part
is submitted (a Classify whose images decode in a thread pool meanwhile, say). The
:class:`Door` counts those on their way, with the queue; a request beyond the bound is refused
with :class:`QueueFull` at once, before any decoding or compute.

A request's places are kept in its context (:func:`admitted`), so its first submission gives up
all of them (:func:`arrived`) from any task it spawned, without passing them along by hand: a
ClassifyDense holds the classifier and its dense twin, and computes on one of them.

Refusals and the other ways a request ends before compute have a reason (:func:`drop_reason`):
the label of ``convserve_dropped_requests_total`` and of the log's refusal summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator

from service.core.errors import DeadlineExceeded, ResourceExhausted, Unavailable

__all__ = ["Admission", "Door", "Draining", "QueueFull", "admitted", "arrived", "drop_reason"]


class QueueFull(ResourceExhausted):
    """The model's queue bound is reached: RESOURCE_EXHAUSTED.

    Triton answers UNAVAILABLE ("Exceeds maximum queue size"), having no RESOURCE_EXHAUSTED code
    at all. This server answers RESOURCE_EXHAUSTED: it is what gRPC's own load shedding answers
    (a server's concurrent-RPC limit, the core's pending-call limit); it says "this replica is
    busy" where UNAVAILABLE, kept for draining, says "this replica is going away"; and retry
    policies, which by convention resend UNAVAILABLE at once, do not turn each refusal into
    another request against the same overloaded server.
    """

    def __init__(self, waiting: int, bound: int) -> None:
        super().__init__(
            f"queue full: {waiting} requests waiting (max_queue_size {bound}); retry later"
        )


class Draining(Unavailable):
    """The server is shutting down and takes no new work: another replica should."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica")


def drop_reason(exc: BaseException) -> str | None:
    """Why a request that ended with ``exc`` never reached compute, or None for other failures.

    ``queue_full``, ``deadline``, ``cancelled`` (the client went away) or ``draining``: load
    and clients leaving, counted rather than logged one by one. A malformed request or a fault
    of the server is no such refusal.
    """
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, DeadlineExceeded):
        return "deadline"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, Draining):
        return "draining"
    return None


class Door:
    """Counts the requests admitted to one model version that have not reached its queue yet.

    Args:
        bound: ``max_queue_size``; 0 admits everything (an unbounded queue).
        queued: the entries in the batcher's queue now.
        purge: drops the queued entries whose caller has gone or whose deadline has passed and
            returns how many are left; asked only at the bound, so that such entries never
            turn a live request away.
    """

    def __init__(self, bound: int, queued: Callable[[], int], purge: Callable[[], int]) -> None:
        self.bound = bound
        self._queued = queued
        self._purge = purge
        self.arriving = 0

    def waiting(self) -> int | None:
        """The requests waiting here and on their way here when they fill the bound, else None."""
        bound = self.bound
        if not bound or self.arriving + self._queued() < bound:
            return None
        waiting = self.arriving + self._purge()
        return waiting if waiting >= bound else None

    def admit(self) -> Admission:
        """Admit one request, or refuse it when it cannot start within the bound.

        Raises:
            QueueFull: the requests already waiting fill the bound.
        """
        if (waiting := self.waiting()) is not None:
            raise QueueFull(waiting, self.bound)
        self.arriving += 1
        return Admission(self)


class Admission:
    """One admitted request's place at the door, given up once (see :class:`Door`)."""

    __slots__ = ("_door",)

    def __init__(self, door: Door) -> None:
        self._door: Door | None = door

    def release(self) -> None:
        """The request reached a batcher's queue (which counts it there), or finished."""
        if self._door is not None:
            self._door.arriving -= 1
            self._door = None


_HELD: contextvars.ContextVar[list[Admission] | None] = contextvars.ContextVar(
    "admissions", default=None
)


@contextlib.contextmanager
def admitted(admission: Admission) -> Iterator[None]:
    """Keep ``admission`` in the request's context for the block, and give it up at its end."""
    held = _HELD.get()
    token = None
    if held is None:
        held = []
        token = _HELD.set(held)
    held.append(admission)
    try:
        yield
    finally:
        admission.release()
        if token is not None:
            _HELD.reset(token)


def arrived() -> None:
    """The request of this context reached a batcher: it gives up its places at every door."""
    held = _HELD.get()
    if held:
        for admission in held:
            admission.release()
        held.clear()
