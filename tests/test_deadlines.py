"""Deadlines counted: a request whose deadline passed before compute is counted, never computed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from service.core.errors import DeadlineExceeded
from service.engine.batcher import BatchQueue
from service.engine.dataplane import DataPlane
from tests.batcher_stand_ins import Counting, Recorder, policy, rows
from tests.rpc_stand_ins import METHOD, Infer, dropped, requests, serve


@pytest.fixture()
async def served() -> AsyncIterator[tuple[Infer, str]]:
    servicer = Infer()
    async for address in serve(servicer):
        yield servicer, address


def _call(address: str, timeout: float | None, result: list[grpc.StatusCode]) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        try:
            channel.unary_unary(METHOD)(b"", timeout=timeout)
            result.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            result.append(exc.code())


async def test_a_call_whose_deadline_passed_before_its_request_was_read_is_counted(
    served: tuple[Infer, str],
) -> None:
    """gRPC holds a call until the server picks it up: dead by then, it is still counted."""
    servicer, address = served
    before = requests("DEADLINE_EXCEEDED"), dropped("deadline")
    # Warm the server's side of a connection first, so only the blocked loop delays the call.
    await asyncio.to_thread(_call, address, 5, [])
    assert servicer.calls == 1
    result: list[grpc.StatusCode] = []
    client = threading.Thread(target=_call, args=(address, 0.05, result))
    client.start()
    time.sleep(0.5)  # the server's loop is busy: the call waits in gRPC past its deadline
    await asyncio.to_thread(client.join, 10)
    assert result == [grpc.StatusCode.DEADLINE_EXCEEDED]
    for _ in range(100):  # the server picks the dead call up once its loop turns again
        if requests("DEADLINE_EXCEEDED") > before[0]:
            break
        await asyncio.sleep(0.01)
    assert requests("DEADLINE_EXCEEDED") == before[0] + 1
    assert dropped("deadline") == before[1] + 1
    assert servicer.calls == 1  # never handled


async def test_grpc_cancelling_a_call_at_its_deadline_counts_a_deadline(
    served: tuple[Infer, str],
) -> None:
    servicer, address = served
    servicer.delay = 5.0
    before = requests("DEADLINE_EXCEEDED"), requests("CANCELLED")
    result: list[grpc.StatusCode] = []
    await asyncio.to_thread(_call, address, 0.2, result)
    assert result == [grpc.StatusCode.DEADLINE_EXCEEDED]
    await asyncio.sleep(0.1)
    assert (requests("DEADLINE_EXCEEDED"), requests("CANCELLED")) == (before[0] + 1, before[1])


async def test_a_client_that_cancels_is_counted_as_cancelled(served: tuple[Infer, str]) -> None:
    servicer, address = served
    servicer.delay = 5.0
    before = requests("CANCELLED"), dropped("cancelled")
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)(b"", timeout=30)
        while servicer.calls == 0:
            await asyncio.sleep(0.01)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    for _ in range(100):
        if requests("CANCELLED") > before[0]:
            break
        await asyncio.sleep(0.01)
    assert (requests("CANCELLED"), dropped("cancelled")) == (before[0] + 1, before[1] + 1)


class Drops(Counting):
    """Counts the batcher's drops by reason."""

    def __init__(self) -> None:
        super().__init__()
        self.drops: list[str] = []

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)


async def test_a_request_cancelled_at_its_deadline_in_the_queue_is_dropped_as_expired() -> None:
    """gRPC's cancellation at the deadline reaches the batcher as an expiry, not a departure."""
    run, seen = Recorder(), Drops()
    run.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        queue = BatchQueue(run, [pool], policy(1), observer=seen)
        busy = queue.submit({"x": rows(1, 0)}, 1, (3,), None)
        await asyncio.to_thread(run.entered.wait, 5)
        deadline = time.monotonic() + 0.05
        waiting = queue.submit({"x": rows(1, 1)}, 1, (3,), deadline)
        left = queue.submit({"x": rows(1, 2)}, 1, (3,), None)
        expiring = asyncio.create_task(DataPlane._wait(waiting, deadline))
        leaving = asyncio.create_task(DataPlane._wait(left, time.monotonic() + 10))
        await asyncio.sleep(0)  # both wait for their rows
        # The loop is busy past the first deadline; gRPC's own timer cancels that call before
        # the data plane's timer has its turn, and the other client leaves.
        time.sleep(0.1)
        expiring.cancel()
        leaving.cancel()
        await asyncio.gather(expiring, leaving, return_exceptions=True)
        assert isinstance(waiting.exception(), DeadlineExceeded) and left.cancelled()
        run.gate.set()
        await busy
        after = await queue.submit({"x": rows(1, 3)}, 1, (3,), None)
        np.testing.assert_array_equal(after[0], rows(1, 3) * 2 + 1)
        assert run.sizes == [1, 1]  # neither dropped request reached the model
        assert sorted(seen.drops) == ["cancelled", "deadline"]
        await queue.close()
