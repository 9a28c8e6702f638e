"""The batcher on its own, with a runtime stand-in that records what it was given."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable
from service.engine.batcher import BatchQueue
from tests.batcher_stand_ins import Counting, Recorder, policy, rows


@pytest.fixture()
def executor():
    with ThreadPoolExecutor(4) as pool:
        yield pool


async def test_lone_request_pays_no_window(executor) -> None:
    run = Recorder()
    queue = BatchQueue(run, [executor], policy(8))
    out = await queue.submit({"x": rows(2, 0)}, 2, (3,), None)
    np.testing.assert_array_equal(out[0], rows(2, 0) * 2 + 1)
    assert run.sizes == [2]
    await queue.close()


async def test_tiny_models_run_a_lone_request_at_once_inside_submit(executor) -> None:
    run, seen = Recorder(), Counting()
    queue = BatchQueue(run, [executor], policy(8), observer=seen, inline_below_seconds=1.0)
    first = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    assert not first.done()  # nothing is known of the model yet: the worker runs it
    await first
    second = queue.submit({"x": rows(1, 5)}, 1, (3,), None)
    assert second.done()  # typical compute is tiny: answered before submit returned
    np.testing.assert_array_equal(second.result()[0], rows(1, 5) * 2 + 1)
    assert seen.waits[-1] == 0.0 and seen.batches == [(1, 1), (1, 1)]
    expired = queue.submit({"x": rows(1, 0)}, 1, (3,), time.monotonic() - 1)
    assert isinstance(expired.exception(), DeadlineExceeded) and run.sizes == [1, 1]
    await queue.close()


async def test_requests_queued_while_busy_share_the_next_batch(executor) -> None:
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(8))
    first = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)  # the instance is now busy with `first`
    later = [queue.submit({"x": rows(1, 10 * i)}, 1, (3,), None) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in later)
    run.gate.set()
    results = await asyncio.gather(first, *later)
    assert run.sizes == [1, 5]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result[0], rows(1, 10 * i) * 2 + 1)
    await queue.close()


async def test_shapes_never_share_a_batch(executor) -> None:
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(16))
    blocker = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    small = [queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(3)]
    wide = [queue.submit({"x": np.ones((1, 5), np.float32)}, 1, (5,), None) for _ in range(2)]
    run.gate.set()
    await asyncio.gather(blocker, *small, *wide)
    assert run.sizes == [1, 3, 2]
    await queue.close()


async def test_preferred_batch_size_cuts_the_batch(executor) -> None:
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(16, preferred_batch_size=[4]))
    blocker = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    rest = [queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(6)]
    run.gate.set()
    await asyncio.gather(blocker, *rest)
    assert run.sizes == [1, 4, 2]
    await queue.close()


def test_a_request_above_the_preferred_cut_still_runs() -> None:
    """9 images queued with preferred sizes 8 and 16: the cut is 8, the request must go whole.

    Run on a loop in a thread of its own: a worker that never takes the head spins that loop
    forever without a turn, which no timeout on the same loop could end.
    """

    async def scenario() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            run = Recorder()
            queue = BatchQueue(run, [pool], policy(32, preferred_batch_size=[8, 16]))
            out = await queue.submit({"x": rows(9, 0)}, 9, (3,), None)
            np.testing.assert_array_equal(out[0], rows(9, 0) * 2 + 1)
            await queue.close()
            return run.sizes

    result: list[list[int]] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(scenario())), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the batch worker spun without running the request"
    assert result == [[9]]


async def test_a_model_without_a_batch_axis_gets_its_outputs_whole(executor) -> None:
    """max_batch_size 0: the first dimension is the model's own; nothing is split or checked."""

    def run(feeds, instance):  # type: ignore[no-untyped-def]
        return [feeds["x"].sum(axis=1), np.arange(7, dtype=np.int64)]

    queue = BatchQueue(run, [executor], policy(0))
    first, second = (
        queue.submit({"x": rows(3, 0)}, 1, (3, 3), None),
        queue.submit({"x": rows(3, 10)}, 1, (3, 3), None),
    )
    for future, start in ((first, 0), (second, 10)):
        sums, counts = await future
        np.testing.assert_array_equal(sums, rows(3, start).sum(axis=1))
        np.testing.assert_array_equal(counts, np.arange(7))
    await queue.close()


async def test_a_batch_that_cannot_be_stacked_fails_alone_and_the_worker_lives_on(
    executor,
) -> None:
    """An error outside the model (here: stacking) fails that batch, not the whole queue."""
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(8))
    busy = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    # one key, two widths: a caller bug np.concatenate refuses
    clash = [
        queue.submit({"x": rows(1, 1)}, 1, (3,), None),
        queue.submit({"x": np.zeros((1, 4), np.float32)}, 1, (3,), None),
    ]
    run.gate.set()
    await busy
    for future in clash:
        with pytest.raises(ServingError, match="inference failed inside the runtime"):
            await asyncio.wait_for(future, 10)
    after = await asyncio.wait_for(queue.submit({"x": rows(2, 5)}, 2, (3,), None), 10)
    np.testing.assert_array_equal(after[0], rows(2, 5) * 2 + 1)
    await queue.close()


async def test_close_lets_a_holder_submit_its_later_parts_then_refuses(executor) -> None:
    queue = BatchQueue(Recorder(), [executor], policy(4))
    with queue.held():
        first = await queue.submit({"x": rows(1, 0)}, 1, (3,), None)
        closing = asyncio.create_task(queue.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # it waits for the holder
        later = await queue.submit({"x": rows(2, 5)}, 2, (3,), None)
    await asyncio.wait_for(closing, 5)
    np.testing.assert_array_equal(first[0], rows(1, 0) * 2 + 1)
    np.testing.assert_array_equal(later[0], rows(2, 5) * 2 + 1)
    with pytest.raises(Unavailable, match="being unloaded"):
        queue.submit({"x": rows(1, 0)}, 1, (3,), None)


async def test_full_queue_is_refused_at_once(executor) -> None:
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(1, max_queue_size=2))
    busy = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    waiting = [queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(2)]
    with pytest.raises(ResourceExhausted, match=r"queue full: 2 requests waiting"):
        queue.submit({"x": rows(1, 9)}, 1, (3,), None)
    run.gate.set()
    await asyncio.gather(busy, *waiting)
    await queue.close()


async def test_a_cancelled_request_does_not_hold_a_place_in_a_full_queue(executor) -> None:
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(1, max_queue_size=2))
    busy = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    gone = queue.submit({"x": rows(1, 1)}, 1, (3,), None)
    waiting = queue.submit({"x": rows(1, 2)}, 1, (3,), None)
    gone.cancel()  # the caller went away; its entry is still queued
    late = queue.submit({"x": rows(1, 3)}, 1, (3,), None)  # took the dead entry's place
    with pytest.raises(ResourceExhausted):
        queue.submit({"x": rows(1, 4)}, 1, (3,), None)  # two live ones waiting: full
    run.gate.set()
    await asyncio.gather(busy, waiting, late)
    np.testing.assert_array_equal((await late)[0], rows(1, 3) * 2 + 1)
    assert run.sizes == [1, 1, 1]
    await queue.close()


async def test_expired_and_cancelled_requests_cost_no_compute(executor) -> None:
    run = Recorder()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(8))
    busy = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    expired = queue.submit({"x": rows(1, 1)}, 1, (3,), time.monotonic() + 0.01)
    cancelled = queue.submit({"x": rows(1, 2)}, 1, (3,), None)
    alive = queue.submit({"x": rows(1, 3)}, 1, (3,), None)
    cancelled.cancel()
    await asyncio.sleep(0.05)
    run.gate.set()
    await busy
    np.testing.assert_array_equal((await alive)[0], rows(1, 3) * 2 + 1)
    with pytest.raises(DeadlineExceeded):
        await expired
    assert run.sizes == [1, 1]  # only `busy` and `alive` reached the model
    await queue.close()


async def test_an_error_reaches_the_whole_batch_and_the_next_batch_runs(executor) -> None:
    run, seen = Recorder(fail_when=lambda x: bool((x < 0).any())), Counting()
    run.gate.clear()
    queue = BatchQueue(run, [executor], policy(8), observer=seen)
    busy = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    doomed = [queue.submit({"x": rows(1, i)}, 1, (3,), None) for i in range(2)]
    doomed.append(queue.submit({"x": -rows(1, 1)}, 1, (3,), None))
    run.gate.set()
    await busy
    for future in doomed:
        with pytest.raises(ServingError, match="inference failed inside the runtime"):
            await future
    after = await queue.submit({"x": rows(2, 5)}, 2, (3,), None)
    np.testing.assert_array_equal(after[0], rows(2, 5) * 2 + 1)
    assert run.sizes == [1, 3, 2]
    assert seen.batches == [(1, 1), (2, 1)]  # the failed batch is no inference (as in Triton)
    await queue.close()


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=24),
    instances=st.integers(min_value=1, max_value=3),
)
def test_every_request_gets_exactly_its_own_rows(sizes: list[int], instances: int) -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(4) as pool:
            run = Recorder()
            queue = BatchQueue(run, [pool] * instances, policy(8))
            inputs = [rows(n, 1000 * i) for i, n in enumerate(sizes)]
            results = await asyncio.gather(
                *(queue.submit({"x": x}, len(x), (3,), None) for x in inputs)
            )
            for x, result in zip(inputs, results, strict=True):
                np.testing.assert_array_equal(result[0], x * 2 + 1)
            assert sum(run.sizes) == sum(sizes) and max(run.sizes) <= 8
            await queue.close()

    asyncio.run(scenario())


def test_cuda_batch_buckets() -> None:
    from service.engine.model_loader import warm_up_sizes as _warm_up_sizes

    assert _warm_up_sizes(32, (), buckets=False) == [1, 32]
    assert _warm_up_sizes(32, (12,), buckets=True) == [1, 2, 4, 8, 12, 16, 32]
    assert _warm_up_sizes(0, (), buckets=True) == [1]
