"""The server's phase (starting, serving, draining, stopped) and every readiness answer from it.

One :class:`Lifecycle` per server decides what the health statuses, KServe's ServerLive,
ServerReady and ModelReady, the data plane's refusal of new work and a worker's ready file say:

* live: until the server has stopped, unless a model call has run longer than
  ``--max-inference-seconds`` (:meth:`Lifecycle.watch`): then the server is wedged, and a restart
  is what brings it back;
* ready (the server): serving, not draining, and every model it is meant to serve is loaded and
  warm: those loaded at the start or since and not unloaded since (a reloading one counts as
  its served version; one whose first load failed is not meant to be served);
* a model ready: its name (and version) is served, and the server is not draining;
* new work accepted: until the server starts draining.

It also keeps the door of the drain: each call is admitted or refused once, when it arrives
(:meth:`Lifecycle.admit`), and a call admitted before the drain began is served to its end, all
of its work included, while the drain waits for it (:meth:`Lifecycle.finished`).

It knows no gRPC: listeners (the health servicer) hear of every change and read the answers back.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from service.core.errors import ModelNotFound
from service.engine import metrics

__all__ = ["Lifecycle", "Listener", "ModelStates", "Phase", "Running"]

log = logging.getLogger(__name__)

_ADMITTED: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "convserve_admitted", default=None
)
"""The door's answer for the call whose context this is; None outside any admitted call."""


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
phase, the server's readiness or its liveness did); it reads the answers back from the lifecycle."""

Running = Callable[[], float | None]
"""When the longest-running model call now in the runtime began (monotonic), or None."""


class Lifecycle:
    """See the module docstring."""

    def __init__(self, models: ModelStates) -> None:
        self._models = models
        self._phase = Phase.STARTING
        self._listeners: list[Listener] = []
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._wedged = False
        self._late: set[str] = set()  # kinds of call admitted while draining (see draining)
        self._refused_at = 0.0  # when the door last refused a call (monotonic)
        self.drain_begun = asyncio.Event()
        """Set when the drain begins: a stream stops reading and ends once it has answered."""

    @property
    def phase(self) -> Phase:
        """Where the server is in its life."""
        return self._phase

    # -- answers ---------------------------------------------------------------------------------
    def live(self) -> bool:
        """The server answers (it has not stopped) and no model call is wedged in the runtime.

        The one answer behind the health service ``liveness`` and ServerLive.
        """
        return self._phase < Phase.STOPPED and not self._wedged

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

    # -- the door --------------------------------------------------------------------------------
    def admit(self, kind: str = "") -> bool:
        """Admit or refuse the call of the present context, once, as it arrives.

        Admitted (until the drain begins; a call of a ``kind`` the drain is catching up with,
        until :meth:`caught_up`), the call counts as in flight until :meth:`release`, and its
        work is taken even after the drain has begun (:meth:`admitted`), so a request the server
        took is never refused half-way. The answer holds for the whole context: the call's own
        task and the tasks it starts.
        """
        phase = self._phase
        taken = phase < Phase.DRAINING or (phase == Phase.DRAINING and kind in self._late)
        _ADMITTED.set(taken)
        if taken:
            self._in_flight += 1
            self._idle.clear()
        else:
            self._refused_at = time.monotonic()
        return taken

    def release(self) -> None:
        """An admitted call has ended (answered, failed or cancelled)."""
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    def admitted(self) -> bool:
        """Whether work of the present context is taken.

        Work of a call :meth:`admit` answered is taken as it answered; other work (no door
        counted it) while the server accepts work.
        """
        taken = _ADMITTED.get()
        return self.accepts_work() if taken is None else taken

    @property
    def in_flight(self) -> int:
        """Admitted calls that have not ended."""
        return self._in_flight

    def caught_up(self, kind: str) -> None:
        """Every call of ``kind`` received before the drain has been admitted: refuse the rest."""
        self._late.discard(kind)

    async def quiet(self, seconds: float, timeout: float) -> None:
        """Wait until the door has refused no call for ``seconds``, at most ``timeout`` seconds.

        A call refused at the door is still answered (UNAVAILABLE); one that gRPC holds when the
        server stops is cancelled instead, so the server stops once clients have stopped calling.
        """
        ends = time.monotonic() + timeout
        while (now := time.monotonic()) < ends and now - self._refused_at < seconds:
            await asyncio.sleep(min(seconds, ends - now))

    async def finished(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until no admitted call is left; whether none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- the wedge watch ------------------------------------------------------------------------
    async def watch(self, running: Running, bound: float) -> None:
        """Turn not live while a model call has run longer than ``bound`` seconds (0: never).

        A call that never returns holds its runtime thread and every request queued behind it;
        only a restart frees them, so liveness says so and Kubernetes restarts the pod. Should
        the call return first, the server is live again. Runs until cancelled; the age of the
        longest-running call is also ``convserve_longest_inference_seconds``.
        """
        period = min(1.0, bound / 4) if bound > 0 else 1.0
        while True:
            await asyncio.sleep(period)
            began = running()
            age = 0.0 if began is None else time.monotonic() - began
            metrics.LONGEST_INFERENCE.set(age)
            wedged = bound > 0 and age > bound
            if wedged == self._wedged:
                continue
            self._wedged = wedged
            if wedged:
                log.error(
                    "a model call has run for %.1f s, past --max-inference-seconds %g: the server "
                    "is wedged; liveness is NOT_SERVING so that it is restarted",
                    age,
                    bound,
                )
            else:
                log.warning("the wedged model call returned; liveness is SERVING again")
            await self._tell(())

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

    async def draining(self, catching_up: Sequence[str] = ()) -> None:
        """Shutdown began: refuse new calls, end streams, and nothing is ready any more.

        ``catching_up``: kinds of call still admitted until :meth:`caught_up`, because calls of
        them received before the drain may still be waiting to be picked up.
        """
        if self._phase < Phase.DRAINING:
            self._late = set(catching_up)
        await self._enter(Phase.DRAINING)
        self.drain_begun.set()

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
