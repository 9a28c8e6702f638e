"""The streaming machinery on its own: completion order, bounded reading, breaks, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.wire.streams import completion_order


async def numbers(
    count: int, pulled: list[int], fail_after: int | None = None
) -> AsyncIterator[int]:
    for i in range(count):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("the client's stream broke")
        pulled.append(i)
        yield i


async def test_every_message_is_answered_as_it_completes() -> None:
    async def answer(i: int) -> int:
        await asyncio.sleep((5 - i) * 0.02)  # later messages finish first
        return i * 10

    got = [a async for a in completion_order(numbers(5, []), answer, limit=8)]
    assert got == [40, 30, 20, 10, 0]


async def test_a_client_that_does_not_read_stops_being_read() -> None:
    pulled: list[int] = []

    async def answer(i: int) -> int:
        return i

    stream = completion_order(numbers(1000, pulled), answer, limit=4)
    first = await anext(stream)
    await asyncio.sleep(0.2)  # the consumer reads nothing more meanwhile
    # 4 answers queued, 4 more holding their places, one waiting for a place, one read
    assert len(pulled) <= 4 + 4 + 2, len(pulled)
    rest = [a async for a in stream]
    assert sorted([first, *rest]) == list(range(1000))


async def test_a_broken_message_stream_answers_what_was_read_then_ends() -> None:
    async def answer(i: int) -> int:
        await asyncio.sleep(0.01)
        return i

    got = [a async for a in completion_order(numbers(10, [], fail_after=3), answer, limit=8)]
    assert sorted(got) == [0, 1, 2]


async def test_stopping_the_stream_cancels_unfinished_answers() -> None:
    started, cancelled = asyncio.Event(), []

    async def answer(i: int) -> int:
        if i == 0:
            return 0
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    stream = completion_order(numbers(3, []), answer, limit=8)
    assert await anext(stream) == 0
    await asyncio.wait_for(started.wait(), 5)
    await stream.aclose()  # what grpc.aio does when the call ends
    await asyncio.sleep(0)
    assert sorted(cancelled) == [1, 2]


async def test_closing_answers_what_was_read_then_ends_without_reading_more() -> None:
    pulled: list[int] = []
    closing, release = asyncio.Event(), asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        for i in range(3):
            pulled.append(i)
            yield i
        await asyncio.Event().wait()  # the client sends nothing more, and does not end

    async def answer(i: int) -> int:
        await release.wait()
        return i

    stream = completion_order(endless(), answer, limit=8, closing=closing)
    reading = asyncio.ensure_future(anext(stream))
    while len(pulled) < 3:
        await asyncio.sleep(0.01)
    closing.set()  # the drain begins while all three are being answered
    await asyncio.sleep(0.05)
    release.set()

    async def rest() -> list[int]:
        return [a async for a in stream]

    got = [await reading, *await asyncio.wait_for(rest(), 5)]  # it ends: not waiting on reads
    assert sorted(got) == [0, 1, 2]
    assert pulled == [0, 1, 2]
