"""Answering a stream of requests concurrently, in completion order, with bounded memory.

The bidirectional streaming RPC's machinery, kept out of the servicer: each message read from
the client becomes a task; answers are yielded as they complete. At most ``limit`` messages are
being answered at a time, and at most ``limit`` answers wait for the client to read them (a
task whose answer cannot be queued keeps its place), so a client that writes without reading
stops being read, and HTTP/2 flow control slows it, instead of the server's memory growing.

When the server drains, a stream stops reading: every message it has read is answered, then the
stream ends, and the servicer ends the call with UNAVAILABLE, so that the client sends the rest
to another replica instead of waiting on this one for the drain's grace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

__all__ = ["completion_order"]

log = logging.getLogger(__name__)

Message = TypeVar("Message")
Answer = TypeVar("Answer")


async def completion_order(
    messages: AsyncIterator[Message],
    answer: Callable[[Message], Awaitable[Answer]],
    limit: int,
    closing: asyncio.Event | None = None,
) -> AsyncIterator[Answer]:
    """Yield ``answer(message)`` for every message, as each completes.

    ``answer`` must not raise (it reports its errors in its answer). When the message stream
    breaks, or ``closing`` is set, no further message is read: the messages read so far are
    still answered, then the stream ends. When the consumer stops (the call was cancelled),
    every unfinished answer is cancelled.
    """
    answers: asyncio.Queue[tuple[Answer] | None] = asyncio.Queue(limit)
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task[None]] = set()

    async def one(message: Message) -> None:
        await answers.put((await answer(message),))

    def release(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    def start(message: Message) -> None:
        task = asyncio.create_task(one(message))
        tasks.add(task)
        task.add_done_callback(release)

    async def run() -> None:
        reader = asyncio.create_task(_read(messages, slots, start))
        waited = {reader} if closing is None else {reader, asyncio.create_task(closing.wait())}
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:  # closing, or this stream's own end: the reader stops
            for task in waited:
                task.cancel()
        await asyncio.wait((reader,))  # until it has stopped, without its cancellation
        await asyncio.gather(*list(tasks), return_exceptions=True)
        await answers.put(None)  # not when cancelled: then nobody reads any more

    runner = asyncio.create_task(run())
    try:
        while (item := await answers.get()) is not None:
            yield item[0]
    finally:
        runner.cancel()
        for task in list(tasks):
            task.cancel()


async def _read(
    messages: AsyncIterator[Message], slots: asyncio.Semaphore, start: Callable[[Message], None]
) -> None:
    """Read messages and ``start`` answering each, one place in ``slots`` each, until the end.

    A place is taken before a message is read, so that stopping the reader between two
    messages (the drain) never drops one that was read.
    """
    iterator = aiter(messages)
    try:
        while True:
            await slots.acquire()
            try:
                message = await anext(iterator)
            except BaseException:
                slots.release()
                raise
            start(message)
    except StopAsyncIteration:
        pass
    except Exception as exc:  # the request stream broke: answer what was read, then end
        log.warning("stream request iterator failed: %s", exc)
