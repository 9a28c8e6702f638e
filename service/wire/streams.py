"""Answering a stream of requests concurrently, in completion order, with bounded memory.

The bidirectional streaming RPC's machinery, kept out of the servicer: each message read from
the client becomes a task; answers are yielded as they complete. At most ``limit`` messages are
being answered at a time, and at most ``limit`` answers wait for the client to read them (a
task whose answer cannot be queued keeps its place), so a client that writes without reading
stops being read, and HTTP/2 flow control slows it, instead of the server's memory growing.
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
    messages: AsyncIterator[Message], answer: Callable[[Message], Awaitable[Answer]], limit: int
) -> AsyncIterator[Answer]:
    """Yield ``answer(message)`` for every message, as each completes.

    ``answer`` must not raise (it reports its errors in its answer). When the message stream
    breaks, the messages read so far are still answered, then the stream ends; when the
    consumer stops (the call was cancelled), every unfinished answer is cancelled.
    """
    answers: asyncio.Queue[tuple[Answer] | None] = asyncio.Queue(limit)
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task[None]] = set()

    async def one(message: Message) -> None:
        await answers.put((await answer(message),))

    def release(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    async def read() -> None:
        try:
            async for message in messages:
                await slots.acquire()
                task = asyncio.create_task(one(message))
                tasks.add(task)
                task.add_done_callback(release)
            await asyncio.gather(*list(tasks))
        except Exception as exc:  # the request stream broke: answer what was read, then end
            log.warning("stream request iterator failed: %s", exc)
            await asyncio.gather(*list(tasks), return_exceptions=True)
        await answers.put(None)  # not when cancelled: then nobody reads any more

    reader = asyncio.create_task(read())
    try:
        while (item := await answers.get()) is not None:
            yield item[0]
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
