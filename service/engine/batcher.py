"""Dynamic batching for one served model: a bounded queue and one worker per runtime instance.

Contract:
* ``submit`` enqueues a request of ``count`` images (its inputs share a leading batch axis) and
  returns its own rows of every output. A full queue raises QueueFull (RESOURCE_EXHAUSTED) at
  once. The bound also holds the requests on their way to the queue (see :meth:`held`).
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
  These decisions are :class:`~service.engine.window.WindowPolicy`'s, which holds the constants.
* A batch holds requests of one shape key only (dense images of different sizes never share a
  batch) and at most ``max_batch_size`` images, cut at the largest preferred size that fits, and
  at most ``batch_rows(key)`` where given (a dense twin's memory: :class:`~.batch.DenseRows`).
* Requests whose deadline has passed or whose caller has gone are dropped before they cost
  compute, and counted, but for the parts of a :meth:`held` request (:func:`~.batch.parts`).
  An error in a batch reaches every request in it; the next batch runs normally.
* ``close`` lets work already holding the batcher (:meth:`BatchQueue.held`: a request that
  submits several times, such as a Classify of more images than one batch takes, with its
  decoding in between) finish before it refuses new submissions, so a reload or an unload that
  swaps the version out in the middle of such a request does not refuse its later parts.
* A batch runs in the thread pool, so the event loop keeps accepting while ONNX Runtime works;
  but when batches typically take less than ``inline_below_seconds`` (tiny models), the hop to a
  thread and back (several times longer under GIL contention) costs more than the model, so
  they run inline on the loop. Then (without a window, or while it is skipped) a request that
  finds the queue empty and an instance free runs at once inside ``submit``: it is the batch a
  worker would have taken next, without the two task switches of handing it to the worker and
  back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from service.core.errors import DeadlineExceeded, ServingError, Unavailable
from service.engine.admission import Door, QueueFull, admitted, arrived
from service.engine.batch import (
    BatchObserver,
    Pending,
    RunBatch,
    fail_batch,
    in_parts,
    parts,
    stack_inputs,
)
from service.engine.model_config import BatchingPolicy
from service.engine.window import WindowPolicy

__all__ = ["BatchQueue"]


class BatchQueue:
    """See the module docstring.

    Args:
        run: runs the model on a stacked batch on one instance.
        executors: one per runtime instance; a worker runs its batches there.
        policy: the model's batching knobs (``default_timeout_microseconds`` is the data
            plane's; the batcher honours each request's own deadline).
        observer: told about batches, queue waits, drops and queue depth.
        inline_below_seconds: batches typically computing faster than this run on the loop.
        batch_rows: the most images a batch of a shape key may hold besides ``max_batch_size``
            (a dense twin's: :class:`~service.engine.batch.DenseRows`); None: no other bound.
    """

    def __init__(
        self,
        run: RunBatch,
        executors: Sequence[Executor],
        policy: BatchingPolicy,
        *,
        observer: BatchObserver | None = None,
        inline_below_seconds: float = 0.0,
        batch_rows: Callable[[Hashable], int] | None = None,
    ) -> None:
        self._run = run
        self._batch_rows = batch_rows
        self._inline_below = inline_below_seconds
        self._typical: float | None = None  # moving average of a batch's compute time
        self._executors = list(executors)
        # 0: the model has no batch axis; each request runs alone and gets the outputs whole.
        self._batching = policy.max_batch_size > 0
        self._max_batch = max(1, policy.max_batch_size)
        self._window = WindowPolicy(policy.max_queue_delay_microseconds / 1e6)
        self._probing = False  # submit decided the next batch waits the window
        self._preferred = sorted(p for p in policy.preferred_batch_size if p <= self._max_batch)
        self._max_queue = policy.max_queue_size
        self._observer = observer
        self._queue: deque[Pending] = deque()
        self._door = Door(self._max_queue, self.__len__, self._purge)
        self._busy: dict[int, float] = {}  # instances running a batch in a thread: since when
        self._images = 0
        self._arrived = asyncio.Event()
        self._closing = False
        self._holders = 0  # requests that will submit again (see held)
        self._released = asyncio.Event()
        self._workers = [
            asyncio.create_task(self._work(i), name=f"batch-worker-{i}")
            for i in range(len(self._executors))
        ]

    def __len__(self) -> int:
        """Requests in the queue (some may have expired or lost their caller meanwhile)."""
        return len(self._queue)

    def running_since(self) -> float | None:
        """When the longest-running batch now in a runtime thread began (monotonic), or None."""
        return min(self._busy.values(), default=None)

    @property
    def may_run_inline(self) -> bool:
        """Whether batches that compute fast enough may run on the event loop at all."""
        return self._inline_below > 0

    def submit(
        self, inputs: Mapping[str, np.ndarray], count: int, key: Hashable, deadline: float | None
    ) -> asyncio.Future[list[np.ndarray]]:
        """Enqueue a request; await the returned future for its rows of every output.

        Raises:
            QueueFull: the queue is full.
            Unavailable: the batcher is closing (the model version is being replaced).
        """
        if self._closing:
            raise Unavailable("the model version is being unloaded; retry")
        arrived()  # the request's own places at the doors are not others waiting
        if (waiting := self._door.waiting()) is not None:
            if not in_parts():  # a part's refusal is its request's, counted by its owner
                self._refused()
            raise QueueFull(waiting, self._door.bound)
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        pending = Pending(inputs, count, key, deadline, future)
        if not self._queue and not self._probing and self._inline():
            instance = next((i for i in range(len(self._executors)) if i not in self._busy), None)
            if instance is not None:
                self._probing = self._window.waits()
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

    def _purge(self) -> int:
        """Drop the queued requests whose caller went away or whose deadline passed.

        Called only when the queue looks full, so such dead entries never turn a live request
        away; returns how many requests are left.
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
        return len(alive)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep submissions open for the block: a request with several parts, all on this batcher.

        Taken by a request right after it looked the model up (nothing awaited in between), so
        :meth:`close` lets all of its parts run, however late they come. The request takes a
        place at the door (:mod:`service.engine.admission`) until its first part is submitted.
        Its parts' drops are its own to count (:func:`~service.engine.batch.parts`).

        Raises:
            QueueFull: the requests waiting here and on their way here fill the queue bound.
        """
        try:
            admission = self._door.admit()
        except QueueFull:
            self._refused()
            raise
        self._holders += 1
        try:
            with admitted(admission), parts():
                yield
        finally:
            self._holders -= 1
            if not self._holders:
                self._released.set()

    def _refused(self) -> None:
        if self._observer:
            self._observer.dropped("queue_full")

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
            waited = self._probing or self._window.waits()
            self._probing = False
            full = waited and await self._wait_window()
            batch = self._collect()
            self._window.record(len(batch), waited=waited, full=full)
            try:
                inline = bool(batch) and await self._execute(batch, instance)
            except Exception as exc:  # never lose the worker (and with it the model's queue)
                fail_batch(batch, exc)
                inline = False
            if inline or not batch:
                # Inline: let the handlers that arrived meanwhile enqueue first, so the next
                # batch holds them (the loop has had no turn since the batch began). Empty:
                # never go round without giving the loop a turn.
                await asyncio.sleep(0)

    async def _wait_window(self) -> bool:
        """Wait for company from the first queued request on; True if it ran its whole length.

        It ends early when the batch is full, and once as many requests have queued as the
        window policy's target (the company of the last window that ran its whole length):
        with that many clients, more are unlikely to come within it. A fixed window waits in
        full whenever the clients are fewer than a batch.
        """
        target = self._window.target()
        ends = self._queue[0].enqueued + self._window.delay
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
        observer = None if pending.part else self._observer  # a part's drop is its owner's
        if pending.future.done():  # the caller went away, or its own timeout ended it
            if observer:
                observer.dropped("cancelled" if pending.future.cancelled() else "deadline")
            return False
        if pending.deadline is not None and pending.deadline <= now:
            pending.future.set_exception(
                DeadlineExceeded("deadline passed while the request waited in the queue")
            )
            if observer:
                observer.dropped("deadline")
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
                if self._batch_rows is not None:
                    limit = min(limit, self._batch_rows(key))
            # The head always goes, even above a preferred cut (a request of 9 with preferred
            # sizes 8 and 16 and 9 images queued) or its key's rows: else it would wait forever.
            if pending.key == key and (not batch or images + pending.count <= limit):
                batch.append(pending)
                images += pending.count
                self._images -= pending.count
                if images >= limit:
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
        feeds, total, stacked = stack_inputs(batch)
        self._busy[instance] = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            outputs, elapsed = await loop.run_in_executor(
                self._executors[instance], self._timed, feeds, instance
            )
        except Exception as exc:
            fail_batch(batch, exc)
            return False
        finally:
            self._busy.pop(instance, None)
        self._answer(batch, total, outputs, stacked, elapsed)
        return False

    def _run_inline(self, batch: list[Pending], instance: int) -> None:
        """Run one batch on the loop's own turn (no thread hop) and answer its requests."""
        feeds, total, stacked = stack_inputs(batch)
        try:
            outputs, elapsed = self._timed(feeds, instance)
        except Exception as exc:
            fail_batch(batch, exc)
            return
        self._answer(batch, total, outputs, stacked, elapsed)

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
            fail_batch(batch, error)
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
