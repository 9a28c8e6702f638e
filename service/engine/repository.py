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
server), and if the new version fails to load, the served one goes on.
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
from service.engine.model_config import load_model_config
from service.engine.model_loader import DENSE_SUFFIX, ModelLoader, ServedModel, versions_on_disk
from service.engine.runtime import DeviceChoice

__all__ = ["DENSE_SUFFIX", "ModelRepository", "ModelsChanged", "ServedModel"]

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
        """Every model the server was asked to serve is loaded and warm (unloaded ones aside)."""
        return all(
            state == "READY" or reason == "unloaded" for state, reason in self._state.values()
        )

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
            ModelLoadFailed: its config.json is invalid or a model file does not load.
        """
        logical = self.logical_name(name) if not (self.root / name).is_dir() else name
        folder = self.root / logical
        if not _NAME.match(logical) or not folder.is_dir():
            raise ModelNotFound(name)
        lock = self._locks.setdefault(logical, asyncio.Lock())
        async with lock:
            await self._drained(logical)
            # A reload leaves the served versions READY (and the server ready) until the new
            # ones replace them, and if the new ones fail to load, they keep serving.
            serving = logical in self._served or logical + DENSE_SUFFIX in self._served
            if not serving:
                await self._set_state(logical, "LOADING", "")
            try:
                config = load_model_config(folder / CONFIG_FILE, self._settings)
                chosen = config.versions.select(versions_on_disk(folder))
                if not chosen:
                    raise ModelNotFound(logical)
                built = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._loader.build_all, logical, folder, chosen, config
                )
            except ModelNotFound:
                if not serving:
                    reason = "no version folder with a model.onnx"
                    await self._set_state(logical, "UNAVAILABLE", reason)
                raise
            except Exception as exc:  # onnxruntime raises its own types for bad files
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if serving:
                    log.error("reloading %s failed, its served versions go on: %s", logical, reason)
                else:
                    metrics.MODEL_READY.labels(logical, "", "none").set(0)  # nothing serves it
                    await self._set_state(logical, "UNAVAILABLE", reason)
                raise ModelLoadFailed(logical, reason) from exc
            # READY before the swap, whose change report leads to asking whether all are ready.
            self._state[logical] = ("READY", "")
            await self._swap(logical, [self._loader.serve(b, logical, config) for b in built])

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
        for model in old:  # replaced or unloaded versions leave the gauge, not linger at 0
            labels = (model.name, str(model.version), model.runtime.provider)
            if labels not in ready:
                metrics.forget_ready(*labels)
        if fresh:  # a failed earlier load's "nothing serves it" series goes too
            metrics.forget_ready(logical, "", "none")
        for labels in ready:
            metrics.MODEL_READY.labels(*labels).set(1)
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

    async def close(self) -> None:
        """Drain every batcher, replaced versions' too, then stop the runtimes' threads."""
        await asyncio.gather(_retire(self.served()), *self._retiring.values())


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
