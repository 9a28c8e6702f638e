"""The batcher's window: held until full or over, skipped where it gathers nobody, ended early.

The window's policy alone, without an event loop, is in test_window_policy.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.engine.batcher import BatchQueue
from service.engine.window import LONE_WINDOWS, PROBE_EVERY, REMEASURE_EVERY
from tests.batcher_stand_ins import Counting, Recorder, policy, rows


@pytest.fixture()
def executor():
    with ThreadPoolExecutor(4) as pool:
        yield pool


async def test_a_configured_window_still_gathers_tiny_requests(executor) -> None:
    run = Recorder()
    queue = BatchQueue(
        run, [executor], policy(8, max_queue_delay_microseconds=50_000), inline_below_seconds=1.0
    )
    await queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    pair = [queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in (1, 2)]
    assert not any(f.done() for f in pair)  # they wait for the window, not run one by one
    await asyncio.gather(*pair)
    assert run.sizes == [1, 2]
    await queue.close()


async def test_window_holds_the_batch_until_full(executor) -> None:
    run = Recorder()
    queue = BatchQueue(run, [executor], policy(4, max_queue_delay_microseconds=5_000_000))
    futures = [queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(3)]
    await asyncio.sleep(0.1)
    assert not any(f.done() for f in futures) and run.sizes == []
    futures.append(queue.submit({"x": rows(1, 3)}, 1, (3,), None))
    await asyncio.wait_for(asyncio.gather(*futures), 2)  # full: no need to wait 5 s
    assert run.sizes == [4]
    await queue.close()


async def test_window_ends_on_the_monotonic_clock(executor) -> None:
    run = Recorder()
    queue = BatchQueue(run, [executor], policy(64, max_queue_delay_microseconds=100_000))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(3)))
    assert loop.time() - started >= 0.09
    assert run.sizes == [3]
    await queue.close()


async def test_a_window_that_gathers_nobody_is_skipped_but_probed(executor) -> None:
    run, seen = Recorder(), Counting()
    queue = BatchQueue(
        run,
        [executor],
        policy(8, max_queue_delay_microseconds=20_000),
        inline_below_seconds=1.0,
        observer=seen,
    )
    loop = asyncio.get_running_loop()
    for i in range(LONE_WINDOWS):  # a lone client: each of these waits the whole window
        started = loop.time()
        await queue.submit({"x": rows(1, i)}, 1, (3,), None)
        assert loop.time() - started >= 0.015
    # Now the window is skipped: a tiny model answers inside submit, ...
    answered_at_once = []
    for i in range(PROBE_EVERY):
        future = queue.submit({"x": rows(1, i)}, 1, (3,), None)
        answered_at_once.append(future.done())
        await future
    # ... except the probe, which waits the window again, in case company has come.
    assert answered_at_once == [True] * (PROBE_EVERY - 1) + [False]
    assert run.sizes == [1] * (LONE_WINDOWS + PROBE_EVERY)
    # Company during a probe brings the window back for everyone.
    for i in range(PROBE_EVERY - 1):
        await queue.submit({"x": rows(1, i)}, 1, (3,), None)
    probe = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    company = queue.submit({"x": rows(1, 1)}, 1, (3,), None)
    assert not probe.done() and not company.done()
    await asyncio.gather(probe, company)
    assert run.sizes[-1] == 2
    lone = queue.submit({"x": rows(1, 2)}, 1, (3,), None)
    assert not lone.done()  # the window is back: it waits for company again
    await lone
    assert seen.batches[-1] == (1, 1)
    await queue.close()


async def test_a_window_ends_once_the_company_of_the_last_full_one_has_come(executor) -> None:
    run = Recorder()
    window = 0.3
    queue = BatchQueue(run, [executor], policy(8, max_queue_delay_microseconds=int(window * 1e6)))
    loop = asyncio.get_running_loop()

    async def together(n: int) -> float:
        """Submit n requests at once; seconds until all are answered."""
        started = loop.time()
        await asyncio.gather(*(queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(n)))
        return loop.time() - started

    assert await together(3) >= window * 0.9  # nothing known yet: the whole window
    assert await together(3) < window / 2  # three came last time: three end it
    assert await together(2) >= window * 0.9  # fewer: the window runs out, and two is the mark
    early = [await together(2) < window / 2 for _ in range(REMEASURE_EVERY - 1)]
    assert early == [True] * (REMEASURE_EVERY - 1)
    assert await together(2) >= window * 0.9  # then one runs in full, to see whether more come
    assert run.sizes == [3, 3, 2, *[2] * REMEASURE_EVERY]
    await queue.close()


async def test_with_two_instances_the_window_still_ends_at_the_company(executor) -> None:
    # Both workers wait out the same window; the one that finds it empty measures nothing.
    run, window = Recorder(), 0.3
    queue = BatchQueue(run, [executor, executor], policy(8, max_queue_delay_microseconds=300_000))
    loop = asyncio.get_running_loop()

    async def together(n: int) -> float:
        started = loop.time()
        await asyncio.gather(*(queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(n)))
        return loop.time() - started

    assert await together(3) >= window * 0.9
    assert await together(3) < window / 2
    assert await together(3) < window / 2
    assert run.sizes == [3, 3, 3]
    await queue.close()
