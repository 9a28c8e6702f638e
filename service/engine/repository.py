"""The model repository: which models exist on disk, loading them, and name/version lookup.

Layout (DESIGN.md section 3)::

    <repository>/<model>/<version>/model.onnx         version: a positive integer
    <repository>/<model>/<version>/model.dense.onnx   optional: also served as <model>_dense
    <repository>/<model>/config.json                  optional serving knobs (Triton's names)

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_format import CONFIG_FILE, DENSE_FILE, MODEL_FILE, ModelInfo, read_model_info
from service.core.errors import InvalidArgument, ModelLoadFailed, ModelNotFound, ServingError
from service.core.settings import Settings
from service.engine import metrics
from service.engine.batcher import BatchQueue
from service.engine.model_config import ModelConfig, load_model_config
from service.engine.runtime import DeviceChoice, Runtime, TensorSpec
from service.engine.statistics import ModelStats

__all__ = ["ModelRepository", "ServedModel"]

log = logging.getLogger(__name__)

DENSE_SUFFIX = "_dense"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

HealthHook = Callable[[str, bool], Awaitable[None]]


@dataclass(eq=False)
class ServedModel:
    """One served name at one version: sessions, batcher, description and statistics.

    Attributes:
        name: the served name (``digits`` or ``digits_dense``).
        logical: the model's folder name (``digits``).
        version: the version folder.
        dense: this is the dense twin (``[N, K, *cells]`` out, dynamic spatial axes).
        max_batch_size: images per batch; 0 when the model has no batch axis.
    """

    name: str
    logical: str
    version: int
    dense: bool
    runtime: Runtime
    config: ModelConfig
    max_batch_size: int
    info: ModelInfo
    stats: ModelStats
    batcher: BatchQueue

    @property
    def inputs(self) -> list[TensorSpec]:
        """Input tensors (shape includes the batch axis, -1, when batching)."""
        return self.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """Output tensors."""
        return self.runtime.outputs


@dataclass(frozen=True)
class _Built:
    name: str
    version: int
    dense: bool
    runtime: Runtime
    max_batch_size: int
    info: ModelInfo


def _warm_up_feeds(
    runtime: Runtime, info: ModelInfo, sizes: Sequence[int], batching: bool
) -> list[dict[str, np.ndarray]]:
    samples = []
    for size in sizes if batching else [0]:
        feeds = {}
        for spec in runtime.inputs:
            dims = list(spec.shape[1:] if batching else spec.shape)
            if -1 in dims and info.window and info.channels and len(dims) == len(info.window) + 1:
                dims = [info.channels, *info.window]
            if -1 in dims:
                return []  # variable dimensions with nothing to say what to warm up with
            shape = [size, *dims] if batching else dims
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        samples.append(feeds)
    return samples


def _warm_up_sizes(max_batch: int, preferred: Sequence[int], buckets: bool) -> list[int]:
    """Batch sizes to warm up: 1, the preferred sizes and the maximum.

    On CUDA also the powers of two in between; they become the sizes every batch is padded to.
    """
    sizes = {1, *preferred, max_batch} - {0}
    if buckets:
        sizes |= {2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch}
    return sorted(sizes)


class ModelRepository:
    """See the module docstring."""

    def __init__(
        self,
        root: Path,
        settings: Settings,
        device: DeviceChoice,
        executor: Executor,
        health: HealthHook,
    ) -> None:
        self.root = root
        self._settings = settings
        self._device = device
        self._executor = executor
        self._health = health
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
                self._state[logical] = ("LOADING", "")
            try:
                config = load_model_config(folder / CONFIG_FILE, self._settings)
                on_disk = [
                    int(p.name)
                    for p in folder.iterdir()
                    if p.name.isascii()
                    and p.name.isdigit()
                    and int(p.name) > 0
                    and (p / MODEL_FILE).is_file()
                ]
                chosen = config.versions.select(on_disk)
                if not chosen:
                    raise ModelNotFound(logical)
                built = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._build_all, logical, folder, chosen, config
                )
            except ModelNotFound:
                if not serving:
                    self._state[logical] = ("UNAVAILABLE", "no version folder with a model.onnx")
                raise
            except Exception as exc:  # onnxruntime raises its own types for bad files
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if serving:
                    log.error("reloading %s failed, its served versions go on: %s", logical, reason)
                else:
                    self._state[logical] = ("UNAVAILABLE", reason)
                    metrics.MODEL_READY.labels(logical, "", "none").set(0)  # nothing serves it
                raise ModelLoadFailed(logical, reason) from exc
            # READY before the swap, whose health updates ask whether everything is ready.
            self._state[logical] = ("READY", "")
            await self._swap(logical, [self._serve(b, logical, config) for b in built])

    def _build_all(
        self, logical: str, folder: Path, versions: list[int], config: ModelConfig
    ) -> list[_Built]:
        built = []
        for version in versions:
            for dense, filename in ((False, MODEL_FILE), (True, DENSE_FILE)):
                path = folder / str(version) / filename
                if path.is_file():
                    name = logical + DENSE_SUFFIX if dense else logical
                    built.append(self._build(name, version, path, dense, config))
        return built

    def _build(
        self, name: str, version: int, path: Path, dense: bool, config: ModelConfig
    ) -> _Built:
        device_memory = metrics.gpu_memory_used(self._device.device_id)
        runtime = Runtime(
            path,
            self._device,
            config.instances,
            self._settings.cpu_threads,
            dynamic_shapes=dense,
            processes=self._settings.workers,
        )
        info = read_model_info(runtime.metadata)
        batching = config.batching.max_batch_size > 0
        if batching and any(spec.shape[:1] != (-1,) for spec in runtime.inputs):
            log.warning("%s v%d: first input dimension is fixed, so batching is off", name, version)
            batching = False
        max_batch = config.batching.max_batch_size if batching else 0
        sizes = _warm_up_sizes(
            max_batch, config.batching.preferred_batch_size, runtime.on_cuda and not dense
        )
        if runtime.on_cuda and batching and not dense:
            runtime.buckets = tuple(sizes)
        samples = _warm_up_feeds(runtime, info, sizes[:1] if dense else sizes, batching)
        runtime.warm_up(samples)
        # A model small enough to run on the event loop may cost less CPU on one thread (unless
        # the operator chose the threads). Not a dense twin: its requests are whole images, far
        # larger than the one window it is warmed up with.
        tiny = self._settings.inline_compute_microseconds / 1e6
        tune = not dense and not self._settings.cpu_threads
        if tune and runtime.single_thread_if_cheaper(samples, tiny):
            runtime.warm_up(samples)
        after = metrics.gpu_memory_used(self._device.device_id)
        if runtime.on_cuda and device_memory is not None and after is not None:
            # ONNX Runtime does not report a session's memory; the device's growth across this
            # model's load and warm-up is the best measure there is (loads run one at a time).
            metrics.MODEL_DEVICE_MEMORY.labels(name).set(max(0, after - device_memory))
        log.info(
            "loaded %s v%d from %s on %s (%d instance(s), %d thread(s) each, max_batch_size %d)",
            name,
            version,
            path,
            runtime.provider,
            len(runtime.sessions),
            runtime.threads,
            max_batch,
        )
        return _Built(name, version, dense, runtime, max_batch, info)

    def _serve(self, built: _Built, logical: str, config: ModelConfig) -> ServedModel:
        stats = ModelStats(built.name, str(built.version))
        batching = config.batching
        batcher = BatchQueue(
            built.runtime.run,
            built.runtime.executors,
            max_batch_size=built.max_batch_size,
            max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
            preferred_batch_size=batching.preferred_batch_size,
            max_queue_size=batching.max_queue_size,
            observer=stats,
            # Only where every request costs about the same: a model with a variable height,
            # width or length (dense twins) may get one far larger than the average so far,
            # and that must not stop the event loop.
            inline_below_seconds=0.0
            if any(-1 in spec.shape[1:] for spec in built.runtime.inputs)
            else self._settings.inline_compute_microseconds / 1e6,
        )
        return ServedModel(
            built.name,
            logical,
            built.version,
            built.dense,
            built.runtime,
            config,
            built.max_batch_size,
            built.info,
            stats,
            batcher,
        )

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
        for name in names:
            await self._health(name, name in self._served)
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
            await self._swap(logical, [])
            self._state[logical] = ("UNAVAILABLE", "unloaded")
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
