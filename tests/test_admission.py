"""The door: a model's queue bound holds the requests on their way to its queue too."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from service.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from service.engine.admission import Door, Draining, QueueFull, drop_reason
from service.engine.batcher import BatchQueue
from tests.batcher_stand_ins import Counting, Recorder, policy, rows


class Drops(Counting):
    """Counts the batcher's drops by reason."""

    def __init__(self) -> None:
        super().__init__()
        self.drops: list[str] = []

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)


@pytest.fixture()
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_the_door_counts_requests_on_their_way_with_the_queue() -> None:
    queued = [0]
    purges: list[int] = []

    def purge() -> int:
        purges.append(queued[0])
        return queued[0]

    door = Door(3, lambda: queued[0], purge)
    first, second = door.admit(), door.admit()
    queued[0] = 1
    assert purges == []  # below the bound the queue is not purged
    with pytest.raises(QueueFull, match=r"queue full: 3 requests waiting \(max_queue_size 3\)"):
        door.admit()
    assert purges == [1]
    first.release()
    first.release()  # a place is given up once
    assert door.arriving == 1
    third = door.admit()
    assert door.arriving == 2
    second.release()
    third.release()
    assert Door(0, lambda: 10**6, purge).admit() is not None  # 0: unbounded


def test_queue_full_is_resource_exhausted_and_drop_reasons_name_refusals_only() -> None:
    assert QueueFull(16, 16).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert Draining().code == grpc.StatusCode.UNAVAILABLE
    assert drop_reason(QueueFull(1, 1)) == "queue_full"
    assert drop_reason(DeadlineExceeded("late")) == "deadline"
    assert drop_reason(asyncio.CancelledError()) == "cancelled"
    assert drop_reason(Draining()) == "draining"
    for other in (InvalidArgument("bad"), Unavailable("unloading"), RuntimeError("bug")):
        assert drop_reason(other) is None


async def _holding(queue: BatchQueue, until: asyncio.Event) -> None:
    """A request that holds the model while it decodes its images, say, until ``until``."""
    with queue.held():
        await until.wait()


async def test_requests_holding_the_model_count_against_its_queue_bound(executor) -> None:
    seen = Drops()
    queue = BatchQueue(Recorder(), [executor], policy(4, max_queue_size=2), observer=seen)
    decoded = asyncio.Event()
    holders = [asyncio.create_task(_holding(queue, decoded)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="queue full: 2 requests waiting"), queue.held():
        pass
    with pytest.raises(QueueFull):  # a request that submits at once meets the same door
        queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    assert seen.drops == ["queue_full", "queue_full"]
    decoded.set()
    await asyncio.gather(*holders)
    with queue.held():  # the two finished: room again
        out = await queue.submit({"x": rows(1, 0)}, 1, (3,), None)
    np.testing.assert_array_equal(out[0], rows(1, 0) * 2 + 1)
    await queue.close()


async def test_a_request_gives_up_its_places_once_its_first_part_is_submitted(executor) -> None:
    run = Recorder()
    run.gate.clear()
    classifier = BatchQueue(run, [executor], policy(4, max_queue_size=2))
    twin = BatchQueue(Recorder(), [executor], policy(4, max_queue_size=1))
    busy = classifier.submit({"x": rows(1, 0)}, 1, (3,), None)
    await asyncio.to_thread(run.entered.wait, 5)
    with twin.held(), classifier.held():  # a ClassifyDense: computes on one of the two
        with pytest.raises(QueueFull):
            twin.held().__enter__()  # this request holds the twin's only place
        waiting = classifier.submit({"x": rows(1, 1)}, 1, (3,), None)
        with twin.held():  # the submission gave up both places
            other = classifier.held()
            other.__enter__()
            with pytest.raises(QueueFull):  # queued + the holder just admitted
                classifier.held().__enter__()
            other.__exit__(None, None, None)
    run.gate.set()
    await asyncio.gather(busy, waiting)
    await classifier.close()
    await twin.close()


async def test_a_later_task_of_the_request_gives_up_its_places(executor) -> None:
    queue = BatchQueue(Recorder(), [executor], policy(4, max_queue_size=1))
    with queue.held():

        async def part() -> list[np.ndarray]:
            return await queue.submit({"x": rows(1, 0)}, 1, (3,), None)

        await asyncio.create_task(part())  # a chunk in a task of its own, as Classify runs
        with queue.held():  # admitted: the request's place went with its first part
            pass
    await queue.close()
