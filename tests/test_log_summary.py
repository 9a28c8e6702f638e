"""Logs under fire: refusals and abandoned calls are counted and summed up, faults logged each."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from service.core.errors import InvalidArgument
from service.core.logs import RefusalSummary, configure_logging
from service.engine.admission import QueueFull
from service.wire.rpc import REFUSALS
from tests.rpc_stand_ins import METHOD, Infer, requests, serve

LOGGER = "tests.refusals"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_refusals_make_one_line_after_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    summary = RefusalSummary(logging.getLogger(LOGGER), interval=0.2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for reason in ("queue_full", "deadline", "queue_full", "cancelled", "queue_full"):
            summary.count(reason)
        assert _lines(caplog) == []  # nothing one by one
        await asyncio.sleep(0.4)
        summary.count("deadline")  # the next spell
        await asyncio.sleep(0.4)
    # The spell's length: the interval, or more where the loop was late (a busy machine).
    assert [re.sub(r"last [0-9.]+ s", "last T s", line) for line in _lines(caplog)] == [
        "refused 5 requests in the last T s: queue_full 3, deadline 1, cancelled 1",
        "refused 1 requests in the last T s: deadline 1",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == LOGGER)


def test_without_a_loop_the_next_refusal_after_the_interval_writes_the_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    summary = RefusalSummary(logging.getLogger(LOGGER), interval=0.05)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        summary.count("draining")
        summary.count("draining")
        assert _lines(caplog) == []
        time.sleep(0.1)
        summary.count("queue_full")
        summary.flush()
    assert [line.split(":", 1)[1] for line in _lines(caplog)] == [" draining 2", " queue_full 1"]


@pytest.fixture()
def root_logging() -> Iterator[None]:
    """The root logger's handlers and level as they were, after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_json_summary_carries_its_counts(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")  # here: to the stderr that capsys reads in the test
    summary = RefusalSummary(logging.getLogger(LOGGER), interval=60)
    summary.count("queue_full")
    summary.count("deadline")
    summary.flush()
    (entry,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert entry["level"] == "warning" and entry["refused"] == {"queue_full": 1, "deadline": 1}


@pytest.fixture()
async def served() -> AsyncIterator[tuple[Infer, str]]:
    servicer = Infer()
    async for address in serve(servicer):
        yield servicer, address


async def _refused(address: str, count: int) -> list[grpc.StatusCode]:
    codes = []
    async with grpc.aio.insecure_channel(address) as channel:
        for _ in range(count):
            try:
                await channel.unary_unary(METHOD)(b"", timeout=10)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    return codes


async def test_served_refusals_are_summed_up_and_other_failures_logged_each(
    served: tuple[Infer, str], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, address = served
    REFUSALS.flush()  # what earlier tests in this process left
    caplog.clear()
    before = requests("RESOURCE_EXHAUSTED")
    servicer.error = QueueFull(16, 16)
    with caplog.at_level(logging.INFO, logger="service.wire.accounting"):
        codes = await _refused(address, 30)
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 30
        assert requests("RESOURCE_EXHAUSTED") == before + 30  # counted, every one
        servicer.error = InvalidArgument("input 'x' is not an input of the model")
        assert await _refused(address, 2) == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        REFUSALS.flush()  # what the timer does a few seconds later
    lines = [r for r in caplog.records if r.name == "service.wire.accounting"]
    refused = [r.getMessage() for r in lines if r.getMessage().startswith("refused")]
    assert [re.sub(r"last [0-9.]+ s", "last T s", line) for line in refused] == [
        "refused 30 requests in the last T s: queue_full 30"
    ]
    failed = [r for r in lines if "failed with" in r.getMessage()]
    assert len(failed) == 2 and all("INVALID_ARGUMENT" in r.getMessage() for r in failed)
    assert not [r for r in lines if r.levelno >= logging.ERROR]
