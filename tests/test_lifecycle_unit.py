"""The server's Lifecycle without a server: phases, readiness from model states, drain, listeners.

Also what reads it: the health statuses it translates to, and the data plane's refusal of new
work while draining; and the repository's answer to it, which models it is meant to serve.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from service import BUNDLED_REPOSITORY
from service.core.errors import InvalidArgument, ModelNotFound, Unavailable
from service.core.settings import Settings
from service.engine.dataplane import DataPlane, Outcome
from service.engine.lifecycle import Lifecycle, Phase
from service.engine.repository import ModelRepository
from service.engine.runtime import DeviceChoice
from service.wire.health import Health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Served:
    name: str
    version: int


@dataclass
class Models:
    """Model states as the repository reports them: served names and versions, all ready."""

    served: dict[str, set[int]] = field(default_factory=dict)
    everything_ready: bool = True

    def get(self, name: str, version: str = "") -> Served:
        versions = self.served.get(name)
        if not versions:
            raise ModelNotFound(name)
        if not version:
            return Served(name, max(versions))
        if not version.isdigit():
            raise InvalidArgument(f"model version must be a positive integer, got '{version}'")
        if int(version) not in versions:
            raise ModelNotFound(name, version)
        return Served(name, int(version))

    def all_ready(self) -> bool:
        return self.everything_ready


class Heard:
    """A listener that records what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def __call__(self, names: Sequence[str]) -> None:
        self.calls.append(tuple(names))


async def test_phases_go_forward_only() -> None:
    lifecycle = Lifecycle(Models())
    assert lifecycle.phase is Phase.STARTING
    await lifecycle.serving()
    assert lifecycle.phase is Phase.SERVING
    await lifecycle.draining()
    assert lifecycle.phase is Phase.DRAINING
    await lifecycle.serving()  # a load finishing during the drain brings nothing back
    assert lifecycle.phase is Phase.DRAINING
    await lifecycle.stopped()
    assert lifecycle.phase is Phase.STOPPED
    await lifecycle.draining()
    assert lifecycle.phase is Phase.STOPPED


async def test_a_drain_may_begin_before_the_startup_load_finished() -> None:
    lifecycle = Lifecycle(Models())
    await lifecycle.draining()
    assert lifecycle.phase is Phase.DRAINING and not lifecycle.accepts_work()
    await lifecycle.serving()
    assert not lifecycle.ready()


async def test_server_readiness_needs_the_startup_load_and_every_model() -> None:
    models = Models({"digits": {1}})
    lifecycle = Lifecycle(models)
    assert not lifecycle.ready()  # every model loaded, but the startup load is not over
    await lifecycle.serving()
    assert lifecycle.ready()
    models.everything_ready = False  # a model meant to be served is not
    assert not lifecycle.ready()
    models.everything_ready = True
    assert lifecycle.ready()
    await lifecycle.draining()
    assert not lifecycle.ready()


async def test_liveness_and_new_work_by_phase() -> None:
    lifecycle = Lifecycle(Models())
    seen = []
    for enter in (lifecycle.serving, lifecycle.draining, lifecycle.stopped):
        seen.append((lifecycle.phase, lifecycle.live(), lifecycle.accepts_work()))
        await enter()
    seen.append((lifecycle.phase, lifecycle.live(), lifecycle.accepts_work()))
    assert seen == [
        (Phase.STARTING, True, True),  # a model loaded already takes requests
        (Phase.SERVING, True, True),
        (Phase.DRAINING, True, False),
        (Phase.STOPPED, False, False),
    ]


async def test_a_model_is_ready_while_served_and_not_draining() -> None:
    models = Models({"digits": {1, 2}})
    lifecycle = Lifecycle(models)
    assert lifecycle.model_ready("digits")  # served before the startup load is over
    assert lifecycle.model_ready("digits", "2")
    assert not lifecycle.model_ready("digits", "3")
    assert not lifecycle.model_ready("nope")
    with pytest.raises(InvalidArgument):
        lifecycle.model_ready("digits", "latest")
    await lifecycle.serving()
    models.everything_ready = False  # another model not ready does not make this one unready
    assert lifecycle.model_ready("digits")
    del models.served["digits"]
    assert not lifecycle.model_ready("digits")
    models.served["digits"] = {1}
    await lifecycle.draining()
    assert not lifecycle.model_ready("digits") and not lifecycle.model_ready("digits", "1")


async def test_listeners_hear_the_present_state_then_every_change_in_order() -> None:
    lifecycle = Lifecycle(Models())
    first, second = Heard(), Heard()
    order: list[str] = []

    async def ordered(names: Sequence[str]) -> None:
        order.append("first")
        await first(names)

    async def then(names: Sequence[str]) -> None:
        order.append("second")
        await second(names)

    await lifecycle.listen(ordered)
    assert first.calls == [()]  # at once, before anything changed
    await lifecycle.listen(then)
    assert second.calls == [()] and first.calls == [()]
    await lifecycle.models_changed(["digits", "digits_dense"])
    await lifecycle.models_changed([])  # a load state changed, no served name
    await lifecycle.serving()
    await lifecycle.serving()  # no change: nobody is told
    await lifecycle.draining()
    await lifecycle.stopped()
    expected = [(), ("digits", "digits_dense"), (), (), (), ()]
    assert first.calls == expected and second.calls == expected
    assert order == ["first", "second"] + ["first", "second"] * 5


async def test_listeners_read_the_new_phase() -> None:
    lifecycle = Lifecycle(Models())
    phases = []

    async def listener(names: Sequence[str]) -> None:
        phases.append((lifecycle.phase, lifecycle.ready(), lifecycle.accepts_work()))

    await lifecycle.listen(listener)
    await lifecycle.serving()
    await lifecycle.draining()
    assert phases == [
        (Phase.STARTING, False, True),
        (Phase.SERVING, True, True),
        (Phase.DRAINING, False, False),
    ]


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code: object, details: str = "") -> None:
        raise Aborted(code)


async def status(health: Health, name: str) -> int | None:
    """The health servicer's Check for ``name``; None where it answers NOT_FOUND."""
    request = health_pb2.HealthCheckRequest(service=name)
    try:
        return (await health.servicer.Check(request, Context())).status
    except Aborted:
        return None


async def test_health_translates_the_lifecycle() -> None:
    models = Models()
    lifecycle = Lifecycle(models)
    health = Health(lifecycle)
    await lifecycle.listen(health.update)
    assert await status(health, "") == NOT_SERVING  # while the models load
    models.served["digits"] = {1}
    await lifecycle.models_changed(["digits", "digits_dense"])
    assert await status(health, "digits") == SERVING  # served before the load is over
    assert await status(health, "digits_dense") == NOT_SERVING
    assert await status(health, "") == NOT_SERVING
    assert await status(health, "nope") is None
    await lifecycle.serving()
    assert await status(health, "") == SERVING
    models.everything_ready = False  # a model meant to be served is not ready
    await lifecycle.models_changed([])
    assert await status(health, "") == NOT_SERVING
    assert await status(health, "digits") == SERVING
    models.everything_ready = True
    await lifecycle.models_changed([])
    assert await status(health, "") == SERVING
    del models.served["digits"]  # unloaded
    await lifecycle.models_changed(["digits", "digits_dense"])
    assert await status(health, "digits") == NOT_SERVING
    assert await status(health, "") == SERVING
    models.served["digits"] = {1}
    await lifecycle.models_changed(["digits", "digits_dense"])
    await lifecycle.draining()
    assert [await status(health, n) for n in ("", "digits", "digits_dense")] == [NOT_SERVING] * 3
    await lifecycle.models_changed(["digits", "other"])  # for good: later changes are ignored
    assert await status(health, "digits") == NOT_SERVING
    assert await status(health, "other") is None


async def test_the_data_plane_refuses_new_work_while_draining() -> None:
    models = Models({"digits": {1}})
    lifecycle = Lifecycle(models)
    plane = DataPlane(models, lifecycle)
    outcome = Outcome()
    assert plane.model("digits", "", outcome).version == 1
    await lifecycle.draining()
    refused = Outcome()
    with pytest.raises(Unavailable, match="shutting down"):
        plane.model("digits", "", refused)
    assert (refused.model, refused.version) == ("digits", "1")  # named in its metrics


async def test_a_data_plane_without_a_lifecycle_never_drains() -> None:
    plane = DataPlane(Models({"digits": {1}}))
    assert plane.lifecycle.accepts_work()
    assert plane.model("digits", "1", Outcome()).name == "digits"


async def test_the_repository_counts_only_models_meant_to_be_served(tmp_path: Path) -> None:
    """Loaded and not unloaded since; a model whose first load failed is not one of them."""
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    heard = Heard()

    def ready_series(model: str) -> list[float]:
        return [
            s.value
            for family in REGISTRY.collect()
            for s in family.samples
            if s.name == "convserve_model_ready" and s.labels["model"] == model
        ]

    with ThreadPoolExecutor(2) as executor:
        repository = ModelRepository(tmp_path, Settings(), DeviceChoice("cpu"), executor, heard)
        lifecycle = Lifecycle(repository)
        await lifecycle.serving()
        assert lifecycle.ready()  # nothing meant to be served yet
        assert await repository.load_all() == ["broken"]
        assert lifecycle.ready() and repository.all_ready()
        assert ready_series("broken") == [0.0]  # nothing serves it
        await repository.unload("broken")
        assert ready_series("broken") == [] and lifecycle.ready()
        assert ("broken", "", "UNAVAILABLE", "unloaded") in repository.index()
        await repository.unload("digits")
        assert ready_series("digits") == [] and lifecycle.ready()
        assert not lifecycle.model_ready("digits")
        await repository.load("digits")
        assert lifecycle.model_ready("digits") and ready_series("digits") == [1.0]
        repository.draining()  # no version takes new requests once the drain begins
        assert ready_series("digits") == [0.0]
        await repository.close()
