"""Turns a model folder's version files into warmed-up, servable :class:`ServedModel` objects.

It finds the version folders, opens each version's ONNX Runtime sessions (``model.onnx``, and
``model.dense.onnx`` as the ``<model>_dense`` twin), warms them up at the batch sizes they will
see, and puts a batcher and statistics in front of each. The folder layout is the model
repository's file format (:mod:`model_format`; docs/architecture.md, "The file format").
:mod:`service.engine.repository` decides when to load and which versions serve.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_format import DENSE_FILE, MODEL_FILE, ModelInfo, read_model_info
from service.core.settings import Settings
from service.engine import metrics
from service.engine.batch import DenseRows
from service.engine.batcher import BatchQueue
from service.engine.model_config import ModelConfig
from service.engine.runtime import DeviceChoice, Runtime, TensorSpec
from service.engine.statistics import ModelStats

__all__ = [
    "DENSE_SUFFIX",
    "BuiltModel",
    "ModelLoader",
    "ServedModel",
    "close_built",
    "versions_on_disk",
    "warm_up_sizes",
]

log = logging.getLogger(__name__)

DENSE_SUFFIX = "_dense"


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
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``int8``, as the file's metadata says (``fp32`` where silent)."""
        return self.info.precision_name

    @property
    def inputs(self) -> list[TensorSpec]:
        """Input tensors (shape includes the batch axis, -1, when batching)."""
        return self.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        """Output tensors."""
        return self.runtime.outputs


@dataclass(frozen=True)
class BuiltModel:
    """A version's warmed-up sessions, before a batcher serves them.

    Attributes:
        name: the served name.
        version: the version folder.
        dense: this is the dense twin.
        runtime: the warmed-up sessions.
        max_batch_size: images per batch; 0 when batching is off (config, or a fixed first axis).
        info: what the file's metadata says about it.
    """

    name: str
    version: int
    dense: bool
    runtime: Runtime
    max_batch_size: int
    info: ModelInfo


def close_built(built: Sequence[BuiltModel]) -> None:
    """Stop the sessions of versions that will not serve (a failed or abandoned load)."""
    for model in built:
        model.runtime.close()


def versions_on_disk(folder: Path) -> list[int]:
    """The version folders of a model folder that hold a ``model.onnx``."""
    return [
        int(p.name)
        for p in folder.iterdir()
        if p.name.isascii() and p.name.isdigit() and int(p.name) > 0 and (p / MODEL_FILE).is_file()
    ]


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


def warm_up_sizes(max_batch: int, preferred: Sequence[int], buckets: bool) -> list[int]:
    """Batch sizes to warm up: 1, the preferred sizes and the maximum.

    On CUDA also the powers of two in between; they become the sizes every batch is padded to.
    """
    sizes = {1, *preferred, max_batch} - {0}
    if buckets:
        sizes |= {2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch}
    return sorted(sizes)


def _warn_fp16_on_cpu(name: str, version: int, provider: str) -> None:
    """Say once per version load that an fp16 file on the CPU answers right but gains nothing.

    A warning, not information: nothing is wrong with the answers, but the operator most likely
    deployed the wrong file for the machine. fp16 exports are meant for CUDA; ONNX Runtime's CPU
    provider casts to fp32 and back around every operator it has no fp16 kernel for, so the file
    computes as fp32 at best and is slower where the casts stay. Logged for the classifier only:
    its dense twin is the same export, and one line per load says it.
    """
    log.warning(
        "%s v%d is fp16 and runs on %s: its answers are correct, but fp16 on the CPU is no "
        "faster than fp32 and may be slower; fp16 files are meant for CUDA (on the CPU, serve "
        "the fp32 or int8 export of this model)",
        name,
        version,
        provider,
    )


class ModelLoader:
    """Builds the versions of a model folder on one device with the server's settings."""

    def __init__(self, settings: Settings, device: DeviceChoice) -> None:
        self._settings = settings
        self._device = device

    def build_all(
        self, logical: str, folder: Path, versions: Sequence[int], config: ModelConfig
    ) -> list[BuiltModel]:
        """Open and warm up every file of ``versions`` (blocking: run it on an executor).

        Raises:
            Exception: whatever ONNX Runtime raises for a file that does not load.
        """
        built: list[BuiltModel] = []
        try:
            for version in versions:
                for dense, filename in ((False, MODEL_FILE), (True, DENSE_FILE)):
                    path = folder / str(version) / filename
                    if path.is_file():
                        name = logical + DENSE_SUFFIX if dense else logical
                        built.append(self._build(name, version, path, dense, config))
        except BaseException:
            close_built(built)  # the versions built before the one that failed serve nothing
            raise
        return built

    def _build(
        self, name: str, version: int, path: Path, dense: bool, config: ModelConfig
    ) -> BuiltModel:
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
        sizes = warm_up_sizes(
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
            "loaded %s v%d from %s (%s) on %s (%d instance(s), %d thread(s) each, "
            "max_batch_size %d)",
            name,
            version,
            path,
            info.precision_name,
            runtime.provider,
            len(runtime.sessions),
            runtime.threads,
            max_batch,
        )
        if info.precision_name == "fp16" and not runtime.on_cuda and not dense:
            _warn_fp16_on_cpu(name, version, runtime.provider)
        return BuiltModel(name, version, dense, runtime, max_batch, info)

    def serve(self, built: BuiltModel, logical: str, config: ModelConfig) -> ServedModel:
        """Put a batcher and statistics in front of a built version."""
        # The batcher batches only where the model does: a fixed first axis turns batching off
        # whatever config.json asks for.
        policy = dataclasses.replace(config.batching, max_batch_size=built.max_batch_size)
        stats = ModelStats(built.name, str(built.version))
        # A dense twin's batch of several requests' passes stays within one request's budget.
        settings = self._settings
        rows = DenseRows(settings.dense_memory_bytes, settings.dense_bytes_per_pixel)
        batcher = BatchQueue(
            built.runtime.run,
            built.runtime.executors,
            policy,
            observer=stats,
            inline_below_seconds=self._inline_below(built),
            batch_rows=rows if built.dense else None,
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

    def _inline_below(self, built: BuiltModel) -> float:
        # Only where every request costs about the same: a model with a variable height, width
        # or length (dense twins) may get one far larger than the average so far, and that must
        # not stop the event loop.
        if any(-1 in spec.shape[1:] for spec in built.runtime.inputs):
            return 0.0
        return self._settings.inline_compute_microseconds / 1e6
