"""The model repository: which models serve under which names and versions, and (re)loading them.

The folders follow the model repository's file format (:mod:`model_format`; docs/architecture.md,
"The file format"): ``<repository>/<model>/<version>/model.onnx``, an optional
``model.dense.onnx`` beside it served as ``<model>_dense``, and an optional
``<repository>/<model>/config.json`` of serving knobs under Triton's names.
:mod:`service.engine.model_loader` builds the versions; this module decides when, and swaps them in.

Loading a model again (RepositoryModelLoad) builds and warms the new sessions first, then swaps
them in at once; requests already holding the old version finish on it, and its batcher drains
before it is dropped, so a reload while traffic flows loses no request. As in Triton, the load
returns once the new version serves: the old one drains in the background (a client's deadline on
the load does not have to cover the longest request in flight). A further load of the same model
waits for that drain first, so at most two generations of a model are in memory; an unload and
the server's shutdown wait for it too. While a served model reloads it stays READY (so does the
server), and if the new version fails to load, the served one goes on. A load that takes longer
than ``--model-load-timeout-seconds`` is abandoned the same way (its thread cannot be stopped; the
sessions it builds are closed when it ends).

The models the server is meant to serve are those loaded (at the start or since) and not
unloaded since; a load that fails for a model not served adds nothing to them. The server is
ready while every one of them is served (:meth:`ModelRepository.all_ready`), so one rule holds
in every ``--model-control-mode``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

from model_format import CONFIG_FILE
from service.core.errors import InvalidArgument, ModelLoadFailed, ModelNotFound, ServingError
from service.core.settings import Settings
from service.engine import metrics
from service.engine.model_config import ModelConfig, load_model_config
from service.engine.model_loader import (
    DENSE_SUFFIX,
    BuiltModel,
    ModelLoader,
    ServedModel,
    close_built,
    versions_on_disk,
)
from service.engine.runtime import DeviceChoice

__all__ = ["DENSE_SUFFIX", "LoadTimedOut", "ModelRepository", "ModelsChanged", "ServedModel"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

ModelsChanged = Callable[[Sequence[str]], Awaitable[None]]
"""Told which served names appeared or went (none when only a model's load state changed)."""


class ModelRepository:
    """See the module docstring."""

    def __init__(
        self,
        root: Path,
        settings: Settings,
        device: DeviceChoice,
        executor: Executor,
        changed: ModelsChanged,
    ) -> None:
        self.root = root
        self._settings = settings
        self._loader = ModelLoader(settings, device)
        self._executor = executor
        self._changed = changed
        self._served: dict[str, dict[int, ServedModel]] = {}
        self._state: dict[str, tuple[str, str]] = {}  # logical name -> (state, reason)
        self._wanted: set[str] = set()  # logical names meant to be served (see all_ready)
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: dict[str, asyncio.Task[None]] = {}  # logical name -> old versions draining

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model ``name`` at ``version`` ("" for the highest served).

        Raises:
            ModelNotFound: no such name, or no such version served.
            InvalidArgument: ``version`` is not a positive integer.
        """
        versions = self._served.get(name)
        if not versions:
            raise ModelNotFound(name)
        if not version:
            return versions[max(versions)]
        if not (version.isascii() and version.isdigit()):
            raise InvalidArgument(f"model version must be a positive integer, got '{version}'")
        if len(version.lstrip("0")) > 18:  # past int64: no such folder (int() refuses 4300+)
            raise ModelNotFound(name, version)
        served = versions.get(int(version))
        if served is None:
            raise ModelNotFound(name, version)
        return served

    def served(self) -> list[ServedModel]:
        """Every served model version, by name then version."""
        return [v for name in sorted(self._served) for _, v in sorted(self._served[name].items())]

    def versions(self, name: str) -> list[int]:
        """Served versions of ``name``, ascending."""
        return sorted(self._served.get(name, {}))

    def on_disk(self) -> list[str]:
        """Model folders in the repository."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _NAME.match(p.name) and not p.name.startswith(".")
        )

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk, Triton's repository index."""
        rows = []
        for logical in self.on_disk():
            state, reason = self._state.get(logical, ("UNAVAILABLE", "not loaded"))
            names = [n for n in (logical, logical + DENSE_SUFFIX) if n in self._served]
            if state == "READY" and names:
                rows += [(n, str(v), state, reason) for n in names for v in self.versions(n)]
            else:
                rows.append((logical, "", state, reason))
        return rows

    def all_ready(self) -> bool:
        """Every model the server is meant to serve is loaded and warm.

        Meant to serve: loaded, at the start or since, and not unloaded since. A model whose
        first load failed is not (it is UNAVAILABLE in the index), nor one unloaded; a model
        whose reload failed is, and its served version answers for it.
        """
        return all(self._serves(logical) for logical in self._wanted)

    def _serves(self, logical: str) -> bool:
        return logical in self._served or logical + DENSE_SUFFIX in self._served

    @staticmethod
    def logical_name(name: str) -> str:
        """The folder a served name comes from (``digits_dense`` -> ``digits``)."""
        return name.removesuffix(DENSE_SUFFIX) if name.endswith(DENSE_SUFFIX) else name

    # -- loading ---------------------------------------------------------------------------------
    async def load_all(self, only: Sequence[str] | None = None) -> list[str]:
        """Load every model on disk, or the folders in ``only``; returns those that failed.

        Each failure's reason is logged.
        """
        failed = []
        for logical in self.on_disk() if only is None else only:
            try:
                await self.load(logical)
            except ServingError as exc:
                log.error("%s", exc.message)
                failed.append(logical)
        return failed

    async def load(self, name: str) -> None:
        """(Re)load a model folder: build and warm the new versions, then swap them in.

        Raises:
            ModelNotFound: no such folder (or no version with a model.onnx in it).
            ModelLoadFailed: its config.json is invalid, a model file does not load, or the
                load took longer than ``--model-load-timeout-seconds``.
        """
        logical = self._folder_of(name)
        folder = self.root / logical
        lock = self._locks.setdefault(logical, asyncio.Lock())
        async with lock:
            await self._drained(logical)
            # A reload leaves the served versions READY (and the server ready) until the new
            # ones replace them, and if the new ones fail to load, they keep serving.
            serving = self._serves(logical)
            if not serving:
                await self._set_state(logical, "LOADING", "")
            try:
                config = load_model_config(folder / CONFIG_FILE, self._settings)
                chosen = config.versions.select(versions_on_disk(folder))
                if not chosen:
                    raise ModelNotFound(logical)
                built = await self._build(logical, folder, chosen, config)
            except ModelNotFound:
                if not serving:
                    reason = "no version folder with a model.onnx"
                    await self._set_state(logical, "UNAVAILABLE", reason)
                raise
            except asyncio.CancelledError:  # the caller went away; nothing was swapped in
                if not serving:
                    self._state[logical] = ("UNAVAILABLE", "load cancelled")
                raise
            except Exception as exc:  # onnxruntime raises its own types for bad files
                await self._failed(logical, serving, _first_line(exc))
                raise ModelLoadFailed(logical, _first_line(exc)) from exc
            # READY before the swap, whose change report leads to asking whether all are ready.
            self._state[logical] = ("READY", "")
            self._wanted.add(logical)
            await self._swap(logical, [self._loader.serve(b, logical, config) for b in built])

    def _folder_of(self, name: str) -> str:
        """The model folder a load names: itself, or the folder of a ``_dense`` name.

        The name is checked before any path is built from it, so no name reaches a folder
        outside the repository (``..``, ``/``, a leading dot are refused as not found).

        Raises:
            ModelNotFound: no such folder.
        """
        for logical in (name, self.logical_name(name)):
            if _NAME.match(logical) and (self.root / logical).is_dir():
                return logical
        raise ModelNotFound(name)

    async def _build(
        self, logical: str, folder: Path, versions: list[int], config: ModelConfig
    ) -> list[BuiltModel]:
        """Build ``versions`` on the executor, within ``--model-load-timeout-seconds``.

        Raises:
            LoadTimedOut: the build took longer; it is abandoned (see the module docstring).
        """
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._loader.build_all, logical, folder, versions, config
        )
        limit = self._settings.model_load_timeout_seconds
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except (TimeoutError, asyncio.CancelledError) as exc:
            future.add_done_callback(_close_abandoned)
            if isinstance(exc, TimeoutError):
                raise LoadTimedOut(
                    f"loading took longer than --model-load-timeout-seconds ({limit:g} s); "
                    "abandoned"
                ) from None
            raise

    async def _failed(self, logical: str, serving: bool, reason: str) -> None:
        """Record a failed load: logged and counted; the served versions, if any, go on."""
        metrics.MODEL_LOAD_FAILURES.labels(logical).inc()
        if serving:
            log.error("reloading %s failed, its served versions go on: %s", logical, reason)
            return
        metrics.MODEL_READY.labels(logical, "", "none").set(0)  # nothing serves it
        await self._set_state(logical, "UNAVAILABLE", reason)

    async def _set_state(self, logical: str, state: str, reason: str) -> None:
        """Record a model folder's load state; the server's readiness may follow it."""
        self._state[logical] = (state, reason)
        await self._changed(())

    async def _swap(self, logical: str, fresh: list[ServedModel]) -> None:
        names = (logical, logical + DENSE_SUFFIX)
        old = [m for n in names for m in self._served.get(n, {}).values()]
        for name in names:
            self._served.pop(name, None)
        for model in fresh:
            self._served.setdefault(model.name, {})[model.version] = model
        ready = {(m.name, str(m.version), m.runtime.provider) for m in fresh}
        described = {_described(m) for m in fresh}
        for model in old:  # replaced or unloaded versions leave the gauges, not linger at 0
            labels = (model.name, str(model.version), model.runtime.provider)
            if labels not in ready:
                metrics.forget_ready(*labels)
            if _described(model) not in described:
                metrics.forget_info(*_described(model))
        # A failed earlier load's "nothing serves it" series goes once the model serves, or
        # once it is unloaded: an unloaded model leaves no readiness series behind.
        metrics.forget_ready(logical, "", "none")
        for labels in ready:
            metrics.MODEL_READY.labels(*labels).set(1)
        for description in described:
            metrics.MODEL_INFO.labels(*description).set(1)
        await self._changed(names)
        if old:
            retiring = asyncio.create_task(_retire(old), name=f"retire-{logical}")
            self._retiring[logical] = retiring
            retiring.add_done_callback(lambda task: self._forget(logical, task))

    def _forget(self, logical: str, task: asyncio.Task[None]) -> None:
        if self._retiring.get(logical) is task:
            del self._retiring[logical]

    async def _drained(self, logical: str) -> None:
        """Wait until the versions that ``logical`` replaced or unloaded have drained."""
        if (retiring := self._retiring.get(logical)) is not None:
            await asyncio.shield(retiring)  # a cancelled caller leaves the drain running

    async def unload(self, name: str) -> None:
        """Stop serving a model folder; in-flight requests finish first.

        A name that is not loaded, nor ever was, is a success with nothing to do, as in Triton
        (its API: "unloading a model that is not loaded on server has no affect and success
        code will be returned"), so an unload-then-load script runs the same on both.
        """
        logical = self.logical_name(name) if name not in self._state else name
        if logical not in self._state:
            log.info("unload of %r: no such model is loaded; nothing to do", name[:200])
            return
        async with self._locks.setdefault(logical, asyncio.Lock()):
            # Unloaded before the swap, whose change report leads to asking whether all are ready.
            self._state[logical] = ("UNAVAILABLE", "unloaded")
            self._wanted.discard(logical)
            await self._swap(logical, [])
            await self._drained(logical)
        log.info("unloaded %s", logical)

    def mark_unloaded(self, names: Sequence[str]) -> None:
        """Record model folders as unloaded without having loaded them.

        A replacement worker takes its siblings' state, so that an unload of them succeeds on
        it as it does on the others.
        """
        for logical in names:
            self._state[logical] = ("UNAVAILABLE", "unloaded")

    def running_since(self) -> float | None:
        """When the longest-running model call of a served version began (monotonic), or None."""
        return min(
            (t for m in self.served() if (t := m.batcher.running_since()) is not None),
            default=None,
        )

    def draining(self) -> None:
        """The server drains: no version takes new requests, so none reports ready."""
        for model in self.served():
            labels = (model.name, str(model.version), model.runtime.provider)
            metrics.MODEL_READY.labels(*labels).set(0)

    async def close(self) -> None:
        """Drain every batcher, replaced versions' too, then stop the runtimes' threads."""
        await asyncio.gather(_retire(self.served()), *self._retiring.values())


class LoadTimedOut(Exception):
    """A model's build took longer than ``--model-load-timeout-seconds`` and was abandoned."""


def _described(model: ServedModel) -> tuple[str, str, str, str]:
    """A served version's ``convserve_model_info`` labels: model, version, precision, provider."""
    return (model.name, str(model.version), model.precision, model.runtime.provider)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _close_abandoned(future: asyncio.Future[list[BuiltModel]]) -> None:
    """Close what an abandoned build made, once it ends (its thread cannot be stopped)."""
    if future.cancelled() or future.exception() is not None:
        return
    built = future.result()
    close_built(built)
    log.warning(
        "an abandoned load finished; closed %s",
        ", ".join(f"{m.name} version {m.version}" for m in built) or "nothing",
    )


async def _retire(models: Sequence[ServedModel]) -> None:
    """Let the requests holding ``models`` finish, then stop their runtimes."""
    await asyncio.gather(*(m.batcher.close() for m in models))
    for model in models:
        model.runtime.close()
    if models:
        log.info(
            "drained %s",
            ", ".join(f"{m.name} version {m.version}" for m in models),
        )
