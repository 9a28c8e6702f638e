"""A drain that loses nothing: the door's rules on their own, then ``scripts/drain.py --quick``.

The door (Lifecycle.admit): a call is admitted or refused once, as it arrives; one admitted
before the drain is served to its end, its work included, and the drain waits for it; a kind of
call the drain is catching up with is admitted until its marker arrives. Liveness stays SERVING
through the drain. The script starts a real server, loads it with 32 clients and a stream, and
sends SIGTERM mid-load.
"""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2

from service.core.errors import Unavailable
from service.engine.dataplane import DataPlane, Outcome
from service.engine.lifecycle import Lifecycle
from service.wire.health import LIVENESS, OVERALL, Health
from tests.apart import run_quick
from tests.test_lifecycle_unit import Models

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def in_own_task(work: object) -> object:
    """Run ``work`` (a callable) in a task of its own, as gRPC runs each call."""
    return await asyncio.create_task(_call(work))


async def _call(work: object) -> object:
    return work()  # type: ignore[operator]


async def test_a_call_admitted_before_the_drain_is_served_to_its_end() -> None:
    models = Models({"digits": {1}})
    lifecycle = Lifecycle(models)
    plane = DataPlane(models, lifecycle)
    await lifecycle.serving()
    admitted = asyncio.Event()
    drained = asyncio.Event()

    async def call() -> int:
        assert lifecycle.admit()
        try:
            admitted.set()
            await drained.wait()  # its request is read, its images decoded meanwhile
            return plane.model("digits", "", Outcome()).version  # looked up after the drain
        finally:
            lifecycle.release()

    task = asyncio.create_task(call())
    await admitted.wait()
    await lifecycle.draining()
    assert lifecycle.in_flight == 1
    assert not await lifecycle.finished(0.05)  # the drain waits for it
    drained.set()
    assert await task == 1
    assert await lifecycle.finished(1.0)

    async def late() -> None:
        assert not lifecycle.admit()
        with pytest.raises(Unavailable, match="shutting down"):
            plane.model("digits", "", Outcome())

    await asyncio.create_task(late())
    assert lifecycle.in_flight == 0


async def test_a_kind_being_caught_up_with_is_admitted_until_its_marker() -> None:
    lifecycle = Lifecycle(Models({"digits": {1}}))
    await lifecycle.serving()
    await lifecycle.draining(["ModelInfer", "Classify"])
    assert await in_own_task(lambda: lifecycle.admit("ModelInfer"))
    assert not await in_own_task(lambda: lifecycle.admit("ModelStreamInfer"))
    lifecycle.caught_up("ModelInfer")
    assert not await in_own_task(lambda: lifecycle.admit("ModelInfer"))
    assert await in_own_task(lambda: lifecycle.admit("Classify"))
    assert lifecycle.in_flight == 2


async def test_quiet_waits_for_the_door_to_stop_refusing() -> None:
    lifecycle = Lifecycle(Models())
    await lifecycle.draining()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await lifecycle.quiet(0.05, 1.0)  # nothing refused: at once
    assert loop.time() - began < 0.04

    async def refusing() -> None:
        for _ in range(6):
            await in_own_task(lifecycle.admit)
            await asyncio.sleep(0.02)

    await in_own_task(lifecycle.admit)
    began = loop.time()
    knocking = asyncio.create_task(refusing())
    await lifecycle.quiet(0.05, 1.0)
    assert loop.time() - began >= 0.1  # until the last refusal was 0.05 s ago
    await knocking
    began = loop.time()
    await lifecycle.quiet(10.0, 0.1)  # bounded
    assert loop.time() - began < 0.5


async def test_liveness_stays_serving_through_the_drain_and_readiness_does_not() -> None:
    lifecycle = Lifecycle(Models({"digits": {1}}))
    health = Health(lifecycle)
    await lifecycle.listen(health.update)
    await lifecycle.serving()
    await lifecycle.models_changed(["digits"])

    async def status(name: str) -> object:
        return health.servicer._server_status.get(name)

    assert [await status(n) for n in (OVERALL, "digits", LIVENESS)] == [SERVING] * 3
    await lifecycle.draining()
    assert [await status(n) for n in (OVERALL, "digits")] == [NOT_SERVING] * 2
    assert await status(LIVENESS) == SERVING  # a draining pod is not restarted mid-drain
    assert lifecycle.live()
    await lifecycle.stopped()
    assert await status(LIVENESS) == NOT_SERVING
    assert not lifecycle.live()


def test_drain_quick_loses_nothing() -> None:
    report = run_quick("drain.py")
    unary, stream, server = report["unary"], report["stream"], report["server"]
    assert unary["in_flight_at_sigterm"] > 0
    assert "CANCELLED" not in unary["in_flight_ended"]
    assert unary["in_flight_ended"].get("OK", 0) >= server["held_at_sigterm"] > 0
    assert stream["in_flight_at_sigterm"] > 0
    assert stream["in_flight_answered"] == {"OK": stream["in_flight_at_sigterm"]}
    assert stream["ended"].startswith("UNAVAILABLE")
    assert server["exit_code"] == 0
    assert server["exit_after_sigterm_s"] < server["grace_s"]
