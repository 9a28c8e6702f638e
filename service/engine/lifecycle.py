"""The server's phase (starting, serving, draining, stopped) and every readiness answer from it.

One :class:`Lifecycle` per server decides what the health statuses, KServe's ServerLive,
ServerReady and ModelReady, the data plane's refusal of new work and a worker's ready file say:

* live: until the server has stopped;
* ready (the server): serving, not draining, and every model it is meant to serve is loaded and
  warm: those loaded at the start or since and not unloaded since (a reloading one counts as
  its served version; one whose first load failed is not meant to be served);
* a model ready: its name (and version) is served, and the server is not draining;
* new work accepted: until the server starts draining.

It knows no gRPC: listeners (the health servicer) hear of every change and read the answers back.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from service.core.errors import ModelNotFound

__all__ = ["Lifecycle", "Listener", "ModelStates", "Phase"]


class Phase(enum.IntEnum):
    """The server's phases, in the only order it goes through them."""

    STARTING = 0
    """The port is open, the models load; nothing is ready as a whole yet."""
    SERVING = 1
    """The startup load finished."""
    DRAINING = 2
    """Shutdown began: in-flight work finishes, new work is refused."""
    STOPPED = 3
    """Everything has drained."""


class ModelStates(Protocol):
    """What the lifecycle asks the model repository."""

    def get(self, name: str, version: str = "") -> object:
        """The served model ``name`` at ``version``; raises ModelNotFound where none is."""
        ...

    def all_ready(self) -> bool:
        """Every model the server is meant to serve is loaded and warm."""
        ...


Listener = Callable[[Sequence[str]], Awaitable[None]]
"""Told of a change: the served names whose readiness may have changed (none when only the
phase or the server's readiness did); it reads the answers back from the lifecycle."""


class Lifecycle:
    """See the module docstring."""

    def __init__(self, models: ModelStates) -> None:
        self._models = models
        self._phase = Phase.STARTING
        self._listeners: list[Listener] = []

    @property
    def phase(self) -> Phase:
        """Where the server is in its life."""
        return self._phase

    # -- answers ---------------------------------------------------------------------------------
    def live(self) -> bool:
        """The server answers (it has not stopped)."""
        return self._phase < Phase.STOPPED

    def ready(self) -> bool:
        """The server as a whole is ready: serving, and every model meant to serve is warm.

        The one answer behind the health service "" and ServerReady.
        """
        return self._phase == Phase.SERVING and self._models.all_ready()

    def accepts_work(self) -> bool:
        """New requests are taken (until the drain begins)."""
        return self._phase < Phase.DRAINING

    def model_ready(self, name: str, version: str = "") -> bool:
        """The served name ``name`` at ``version`` ("" for any) takes requests.

        Raises:
            InvalidArgument: ``version`` is not a positive integer (the caller's mistake).
        """
        try:
            self._models.get(name, version)
        except ModelNotFound:
            return False
        return self.accepts_work()

    # -- changes ---------------------------------------------------------------------------------
    async def listen(self, listener: Listener) -> None:
        """Tell ``listener`` of every change from now on, and of the present state at once."""
        self._listeners.append(listener)
        await listener(())

    async def models_changed(self, names: Sequence[str]) -> None:
        """The repository's report: these served names, or the models' load states, changed."""
        await self._tell(names)

    async def serving(self) -> None:
        """The startup load finished."""
        await self._enter(Phase.SERVING)

    async def draining(self) -> None:
        """Shutdown began: refuse new work, and nothing is ready any more."""
        await self._enter(Phase.DRAINING)

    async def stopped(self) -> None:
        """Everything has drained; the server is about to exit."""
        await self._enter(Phase.STOPPED)

    async def _enter(self, phase: Phase) -> None:
        # Phases only move forward: a second SIGTERM, or a load finishing during the drain,
        # must not bring readiness back.
        if phase <= self._phase:
            return
        self._phase = phase
        await self._tell(())

    async def _tell(self, names: Sequence[str]) -> None:
        for listener in self._listeners:
            await listener(names)
