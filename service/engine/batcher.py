"""Dynamic batching for one served model: a bounded queue and one worker per runtime instance.

Contract:
* ``submit`` enqueues a request of ``count`` images (its inputs share a leading batch axis) and
  returns its own rows of every output. A full queue raises ResourceExhausted at once.
* A worker waits for the first request (an Event, no polling). With a zero window it then takes
  whatever has queued, so a lone request pays nothing and batches grow by themselves while an
  instance is busy (work-conserving); with a window it waits until the window, measured from the
  first request on the monotonic clock, ends or the batch is full.
* The window is a maximum, as in Triton, and it is skipped where it cannot pay: after
  ``LONE_WINDOWS`` windows in a row that gathered nobody but their first request, batches run
  without waiting (for tiny models, inside ``submit`` as below), except that every
  ``PROBE_EVERY``-th one waits the window again to see whether company has come. Any batch of
  more than one request brings the window back. So a window tuned for throughput under load
  costs a lone client (concurrency 1) nothing but the occasional probe.
* A window also ends once as many requests have queued as the last window that ran its whole
  length gathered, if that was two or more: with that many clients, more are unlikely to come.
  Every ``REMEASURE_EVERY``-th window runs in full again, to see more come. So a window sized for
  many clients does not make a few wait it out (they would, every batch, with a fixed window).
* A batch holds requests of one shape key only (dense images of different sizes never share a
  batch) and at most ``max_batch_size`` images, cut at the largest preferred size that fits.
* Requests whose deadline has passed or whose caller has gone are dropped before they cost
  compute. An error in a batch reaches every request in it; the next batch runs normally.
* ``close`` lets work already holding the batcher (:meth:`BatchQueue.held`: a request that
  submits several times, such as a Classify of more images than one batch takes, with its
  decoding in between) finish before it refuses new submissions, so a reload or an unload that
  swaps the version out in the middle of such a request does not refuse its later parts.
* A batch runs in the thread pool, so the event loop keeps accepting while ONNX Runtime works;
  but when batches typically take less than ``inline_below_seconds`` (tiny models), the hop to a
  thread and back (0.1-0.3 ms here, several times that under GIL contention) costs more than the
  model, so they run inline on the loop. Then (without a window, or while it is skipped) a
  request that finds the queue empty and an instance free runs at once inside ``submit``: it is
  the batch a worker would have taken next, without the two task switches (about 50 us) of
  handing it to the worker and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.core.errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable

__all__ = [
    "LONE_WINDOWS",
    "PROBE_EVERY",
    "REMEASURE_EVERY",
    "BatchObserver",
    "BatchQueue",
    "Pending",
    "RunBatch",
]

log = logging.getLogger(__name__)

LONE_WINDOWS = 3
"""Windows in a row that gathered only their first request, after which the window is skipped."""

REMEASURE_EVERY = 32
"""While windows end early at the company the last full window gathered, every this-many-th one
runs its whole length again, so that more company is seen (less shows at once: the count is not
reached, and the window runs out)."""

PROBE_EVERY = 256
"""While the window is skipped, every this-many-th batch waits it again: 0.4 % of a lone client's
requests, so its p99 stays clear of the window (at 1 in 128 it showed in a 2.5 s step's p99), and
at 1,000 requests/s the window is back within about 0.25 s of company arriving."""

RunBatch = Callable[[Mapping[str, np.ndarray], int], Sequence[np.ndarray]]
"""``run(feeds, instance)``: every output for a stacked batch, leading axis = total images."""


class BatchObserver(Protocol):
    """Told about what the batcher does (statistics and metrics)."""

    def batch_done(
        self,
        images: int,
        requests: int,
        input_seconds: float,
        compute_seconds: float,
        output_seconds: float,
    ) -> None:
        """A batch ran and was answered: stacking its inputs, the model, splitting outputs.

        A batch that failed is not reported (as in Triton, it is no inference or execution).
        """

    def queued(self, waited_seconds: float) -> None:
        """A request left the queue for a batch."""

    def dropped(self, reason: str) -> None:
        """A request was dropped before compute: deadline, cancelled, queue_full, draining."""

    def depth(self, images: int) -> None:
        """Images now waiting."""


@dataclass(eq=False)
class Pending:
    """One request waiting for its rows."""

    inputs: Mapping[str, np.ndarray]
    count: int
    key: Hashable
    deadline: float | None
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float = field(default_factory=time.monotonic)


class BatchQueue:
    """See the module docstring."""

    def __init__(
        self,
        run: RunBatch,
        executors: Sequence[Executor],
        *,
        max_batch_size: int,
        max_queue_delay_microseconds: int = 0,
        preferred_batch_size: Sequence[int] = (),
        max_queue_size: int = 0,
        observer: BatchObserver | None = None,
        inline_below_seconds: float = 0.0,
    ) -> None:
        self._run = run
        self._inline_below = inline_below_seconds
        self._typical: float | None = None  # moving average of a batch's compute time
        self._executors = list(executors)
        # 0: the model has no batch axis; each request runs alone and gets the outputs whole.
        self._batching = max_batch_size > 0
        self._max_batch = max(1, max_batch_size)
        self._delay = max_queue_delay_microseconds / 1e6
        self._lone = 0  # windows in a row that gathered only their first request
        self._company = 0  # requests the last window that ran its whole length gathered
        self._since_full = 0  # windows since the last one that had to run its whole length
        self._since_probe = 0
        self._probing = False  # submit decided the next batch waits the window
        self._preferred = sorted(p for p in preferred_batch_size if p <= self._max_batch)
        self._max_queue = max_queue_size
        self._observer = observer
        self._queue: deque[Pending] = deque()
        self._busy: set[int] = set()  # instances running a batch now
        self._images = 0
        self._arrived = asyncio.Event()
        self._closing = False
        self._holders = 0  # requests that will submit again (see held)
        self._released = asyncio.Event()
        self._workers = [
            asyncio.create_task(self._work(i), name=f"batch-worker-{i}")
            for i in range(len(self._executors))
        ]

    @property
    def may_run_inline(self) -> bool:
        """Whether batches that compute fast enough may run on the event loop at all."""
        return self._inline_below > 0

    def submit(
        self, inputs: Mapping[str, np.ndarray], count: int, key: Hashable, deadline: float | None
    ) -> asyncio.Future[list[np.ndarray]]:
        """Enqueue a request; await the returned future for its rows of every output.

        Raises:
            ResourceExhausted: the queue is full.
            Unavailable: the batcher is closing (the model version is being replaced).
        """
        if self._closing:
            raise Unavailable("the model version is being unloaded; retry")
        if self._max_queue and len(self._queue) >= self._max_queue and not self._purge():
            if self._observer:
                self._observer.dropped("queue_full")
            raise ResourceExhausted(
                f"queue full: {len(self._queue)} requests waiting (max_queue_size "
                f"{self._max_queue}); retry later"
            )
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        pending = Pending(inputs, count, key, deadline, future)
        if not self._queue and not self._probing and self._inline():
            instance = next((i for i in range(len(self._executors)) if i not in self._busy), None)
            if instance is not None:
                self._probing = self._window_now()
            if instance is not None and not self._probing:
                if self._usable(pending, pending.enqueued):
                    if self._observer:
                        self._observer.queued(0.0)
                    self._run_inline([pending], instance)
                return future
        self._queue.append(pending)
        self._images += count
        if self._observer:
            self._observer.depth(self._images)
        self._arrived.set()
        return future

    def _purge(self) -> bool:
        """Drop the queued requests whose caller went away or whose deadline passed.

        Called only when the queue looks full, so such dead entries never turn a live request
        away; True when that made room.
        """
        now = time.monotonic()
        alive: deque[Pending] = deque()
        for pending in self._queue:
            if self._usable(pending, now):
                alive.append(pending)
            else:
                self._images -= pending.count
        self._queue = alive
        if self._observer:
            self._observer.depth(self._images)
        return len(alive) < self._max_queue

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep submissions open for the block: a request with several parts, all on this batcher.

        Taken by a request right after it looked the model up (nothing awaited in between), so
        :meth:`close` lets all of its parts run, however late they come.
        """
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            if not self._holders:
                self._released.set()

    async def close(self) -> None:
        """Wait for the holders, stop taking requests, finish every queued one, stop the workers."""
        while self._holders:
            self._released.clear()
            await self._released.wait()
        self._closing = True
        self._arrived.set()
        await asyncio.gather(*self._workers, return_exceptions=True)

    # -- the worker loop: wait, collect, drop expired, stack, run, check, split, reply ----------
    async def _work(self, instance: int) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            waited = self._probing or self._window_now()
            self._probing = False
            full = waited and await self._wait_window()
            batch = self._collect()
            if full and batch:  # (with several instances, the others' windows end empty)
                self._company, self._since_full = len(batch), 0
            if waited and len(batch) == 1:
                self._lone += 1
            elif len(batch) > 1:
                self._lone = 0
            try:
                inline = bool(batch) and await self._execute(batch, instance)
            except Exception as exc:  # never lose the worker (and with it the model's queue)
                self._fail(batch, exc)
                inline = False
            if inline or not batch:
                # Inline: let the handlers that arrived meanwhile enqueue first, so the next
                # batch holds them (the loop has had no turn since the batch began). Empty:
                # never go round without giving the loop a turn.
                await asyncio.sleep(0)

    def _window_now(self) -> bool:
        """Whether the next batch waits the window (see the module docstring); counts probes."""
        if not self._delay:
            return False
        if self._lone < LONE_WINDOWS:
            return True
        self._since_probe += 1
        if self._since_probe < PROBE_EVERY:
            return False
        self._since_probe = 0
        return True

    async def _wait_window(self) -> bool:
        """Wait for company from the first queued request on; True if it ran its whole length.

        It ends early when the batch is full, and, where the last window that ran its whole
        length gathered company (two requests or more), once as many requests have queued:
        with that many clients, more are unlikely to come within it. A fixed window waits in
        full whenever the clients are fewer than a batch (the demo model with a 2 ms window:
        at 4 clients, 1,018 against 1,735 requests/s without one; at 64, 2,076 against 1,836).
        """
        target = 0
        if self._company >= 2:
            self._since_full += 1
            if self._since_full < REMEASURE_EVERY:
                target = self._company
        ends = self._queue[0].enqueued + self._delay
        while not self._closing:
            if self._images >= self._max_batch or (target and len(self._queue) >= target):
                return False
            remaining = ends - time.monotonic()
            if remaining <= 0:
                return True
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return True
        return False

    def _usable(self, pending: Pending, now: float) -> bool:
        if pending.future.done():  # the caller went away, or its own timeout ended it
            if self._observer:
                self._observer.dropped("cancelled" if pending.future.cancelled() else "deadline")
            return False
        if pending.deadline is not None and pending.deadline <= now:
            pending.future.set_exception(
                DeadlineExceeded("deadline passed while the request waited in the queue")
            )
            if self._observer:
                self._observer.dropped("deadline")
            return False
        return True

    def _collect(self) -> list[Pending]:
        now = time.monotonic()
        batch: list[Pending] = []
        kept: deque[Pending] = deque()
        key: Hashable = None
        images = 0
        available = self._images
        limit = self._max_batch
        fitting = [p for p in self._preferred if p <= available]
        if fitting:
            limit = fitting[-1]
        while self._queue:
            pending = self._queue.popleft()
            if not self._usable(pending, now):
                self._images -= pending.count
                continue
            if not batch:
                key = pending.key
            # The head always goes, even above a preferred cut (a request of 9 with preferred
            # sizes 8 and 16 and 9 images queued): else it would wait forever.
            if pending.key == key and (not batch or images + pending.count <= limit):
                batch.append(pending)
                images += pending.count
                self._images -= pending.count
                if images == limit:
                    break
            else:
                kept.append(pending)
        kept.extend(self._queue)
        self._queue = kept
        if self._observer:
            self._observer.depth(self._images)
            for pending in batch:
                self._observer.queued(now - pending.enqueued)
        return batch

    def _inline(self) -> bool:
        return self._typical is not None and self._typical < self._inline_below

    async def _execute(self, batch: list[Pending], instance: int) -> bool:
        """Run one batch and answer its requests; True when it ran inline on the loop."""
        if self._inline():
            self._run_inline(batch, instance)
            return True
        feeds, total, stacked = self._stack(batch)
        self._busy.add(instance)
        try:
            loop = asyncio.get_running_loop()
            outputs, elapsed = await loop.run_in_executor(
                self._executors[instance], self._timed, feeds, instance
            )
        except Exception as exc:
            self._fail(batch, exc)
            return False
        finally:
            self._busy.discard(instance)
        self._answer(batch, total, outputs, stacked, elapsed)
        return False

    def _run_inline(self, batch: list[Pending], instance: int) -> None:
        """Run one batch on the loop's own turn (no thread hop) and answer its requests."""
        feeds, total, stacked = self._stack(batch)
        try:
            outputs, elapsed = self._timed(feeds, instance)
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._answer(batch, total, outputs, stacked, elapsed)

    @staticmethod
    def _stack(batch: list[Pending]) -> tuple[dict[str, np.ndarray], int, float]:
        """The batch's feeds, its image count, and the seconds stacking took."""
        stacking = time.perf_counter()
        if len(batch) == 1:
            feeds = dict(batch[0].inputs)
        else:
            feeds = {n: np.concatenate([p.inputs[n] for p in batch]) for n in batch[0].inputs}
        return feeds, sum(p.count for p in batch), time.perf_counter() - stacking

    def _answer(
        self,
        batch: list[Pending],
        total: int,
        outputs: Sequence[np.ndarray],
        stacked: float,
        elapsed: float,
    ) -> None:
        """Check the model's rows and hand every request its own."""
        if not self._batching:  # one request, and no batch axis to split on
            (pending,) = batch
            if not pending.future.done():
                pending.future.set_result(list(outputs))
            if self._observer:
                self._observer.batch_done(total, 1, stacked, elapsed, 0.0)
            return
        wrong = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != total]
        if wrong:
            error = ServingError(f"the model returned {list(wrong[0])} rows for a batch of {total}")
            self._fail(batch, error)
            return
        splitting = time.perf_counter()
        offset = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result([o[offset : offset + pending.count] for o in outputs])
            offset += pending.count
        if self._observer:
            self._observer.batch_done(
                total, len(batch), stacked, elapsed, time.perf_counter() - splitting
            )

    def _timed(
        self, feeds: Mapping[str, np.ndarray], instance: int
    ) -> tuple[Sequence[np.ndarray], float]:
        """Run and time the model alone (no thread hop), and keep the typical time current."""
        started = time.perf_counter()
        outputs = self._run(feeds, instance)
        elapsed = time.perf_counter() - started
        typical = self._typical
        self._typical = elapsed if typical is None else 0.9 * typical + 0.1 * elapsed
        return outputs, elapsed

    @staticmethod
    def _fail(batch: list[Pending], exc: Exception) -> None:
        """Fail every request of the batch with ``exc`` (logged unless a ServingError).

        As in Triton, a failed batch is no inference or execution in the statistics; each
        request's failure is counted where it finishes (the data plane).
        """
        if not isinstance(exc, ServingError):
            log.exception("batch of %d requests failed in the runtime", len(batch), exc_info=exc)
            exc = ServingError("inference failed inside the runtime")
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)
