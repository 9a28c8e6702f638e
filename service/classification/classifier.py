"""Classify and ClassifyDense: images in, labels and class-probability maps out.

Both go through the same data plane and batchers as KServe v2 requests for the same model:
Classify uses the classifier (``<name>``), ClassifyDense the dense twin (``<name>_dense``) or,
in crops mode, the classifier on every window. Decoding and preprocessing run off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from model_format import DenseGeometry, ModelInfo, cell_counts, cell_starts
from service.classification import dense, images
from service.core.errors import InvalidArgument, ModelNotFound, ResourceExhausted
from service.core.settings import Settings
from service.core.types import InferenceRequest
from service.engine import metrics
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import DENSE_SUFFIX, ServedModel

__all__ = ["Classification", "DenseQuery", "DenseResult", "ImageInput", "Labelled"]

T = TypeVar("T")
DEFAULT_TOP_K = 5
MAX_DIVISOR = 8
MAX_SCALE = 4.0
INLINE_ELEMENTS = 64 * 64
"""ClassifyDense copies or crops images of up to this many elements (times the copies) on the
event loop; larger ones on the decoding threads."""

INLINE_PIXELS = 64 * 64
"""Images up to this many pixels are decoded and preprocessed on the event loop: that takes
about 0.14 ms for the demo model's 8x8 images, while the hop to a decoding thread and back cost
about 0.37 ms of CPU more (Classify in-process: 762 us of CPU a request off the loop, 423 us on
it). Larger images, and every ClassifyDense image, go to the decoding threads."""


@dataclass(frozen=True)
class ImageInput:
    """One image: encoded bytes, or an already preprocessed float32 tensor."""

    encoded: bytes | None = None
    tensor: np.ndarray | None = None


@dataclass(frozen=True)
class Labelled:
    """A class with its probability, and for dense results where it peaks."""

    label: str
    index: int
    probability: float
    best_cell: tuple[int, ...] = ()
    box: tuple[int, ...] = ()


@dataclass(frozen=True)
class DenseQuery:
    """The options of one ClassifyDense request."""

    top_k: int = DEFAULT_TOP_K
    divisor: int = 1
    scales: tuple[float, ...] = (1.0,)
    pool: str = "mean"
    mode: str = "dense"
    return_map: bool = True


@dataclass
class DenseResult:
    """What ClassifyDense answers."""

    model: ServedModel
    geometry: DenseGeometry
    stride: tuple[int, ...]
    top: list[Labelled]
    probabilities: np.ndarray | None
    starts: list[list[int]]
    cells: int
    scales: tuple[float, ...] = field(default=(1.0,))


@contextlib.contextmanager
def _held(*models: ServedModel | None) -> Iterator[None]:
    """Hold each model's batcher open for the block (see BatchQueue.held)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(model.batcher.held())
        yield


async def _all(awaitables: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result in order; the first failure (or the caller's cancellation) cancels the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _same_shape(tensors: Sequence[np.ndarray]) -> None:
    """Refuse images of different shapes: one request's images become one batch.

    A model with a dynamic height or width takes any, but one per request.
    """
    first = tensors[0].shape
    for index, tensor in enumerate(tensors):
        if tensor.shape != first:
            raise InvalidArgument(
                f"image {index} is {list(tensor.shape)} but image 0 is {list(first)}; the "
                "images of one request must share a shape"
            )


def _labels(info: ModelInfo, classes: int) -> Sequence[str]:
    return (
        info.labels
        if info.labels and len(info.labels) == classes
        else [str(i) for i in range(classes)]
    )


def _top(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[Labelled]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Labelled(labels[i], int(i), float(probabilities[i])) for i in order]


# Chunks of one large Classify (or crops-mode) request queued at once: enough to fill a few
# instances' batches back to back, few enough to leave room in the queue for other clients.
CHUNKS_IN_FLIGHT = 4


class Classification:
    """The classification API's domain logic (see the module docstring)."""

    def __init__(self, plane: DataPlane, settings: Settings, executor: Executor) -> None:
        self._plane = plane
        self._repository = plane.repository
        self._executor = executor
        self._limits = images.ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self._max_cells = settings.max_map_cells
        self._max_dense_pixels = settings.max_dense_pixels
        self._max_copies = settings.max_dense_copies
        self._max_elements = settings.max_tensor_elements
        self._max_request_pixels = settings.max_request_pixels

    # -- lookup ------------------------------------------------------------------------------------
    def logical_models(self) -> list[ServedModel]:
        """The highest served version of every logical model (no dense twins)."""
        names = sorted({m.name for m in self._repository.served() if not m.dense})
        return [self._repository.get(name) for name in names]

    def models_with_twins(self) -> list[tuple[ServedModel, ServedModel | None]]:
        """Every logical model with its dense twin at the same version, if served."""
        pairs = []
        for model in self.logical_models():
            try:
                twin = self._repository.get(model.name + DENSE_SUFFIX, str(model.version))
            except ModelNotFound:
                twin = None
            pairs.append((model, twin))
        return pairs

    def _classifier(self, name: str, version: str, outcome: Outcome) -> ServedModel:
        if not name:
            served = self.logical_models()
            if len(served) != 1:
                raise InvalidArgument(
                    f"name a model: {len(served)} are served ({', '.join(m.name for m in served)})"
                )
            name = served[0].name
        model = self._plane.model(name, version, outcome)
        if model.dense:
            raise InvalidArgument(
                f"use the logical model name "
                f"'{model.name.removesuffix(DENSE_SUFFIX)}'; the dense twin "
                "is chosen by ClassifyDense"
            )
        return model

    def _dense_twin(self, model: ServedModel, outcome: Outcome) -> ServedModel:
        try:
            twin = self._repository.get(model.name + DENSE_SUFFIX, str(model.version))
        except ModelNotFound:
            raise InvalidArgument(
                f"model '{model.name}' has no dense variant; use Classify or mode=crops"
            ) from None
        outcome.model = twin.name
        return twin

    # -- preprocessing -----------------------------------------------------------------------------
    def _open(self, model: ServedModel, image: ImageInput) -> Image.Image:
        """An encoded image's header, read and checked against the limits (nothing decoded)."""
        if model.info.preprocess is None:
            raise InvalidArgument(
                f"model '{model.name}' has no preprocessing metadata; send "
                "a preprocessed tensor instead of encoded bytes"
            )
        if image.encoded is None:
            raise InvalidArgument("image has neither encoded bytes nor a tensor")
        return images.open_image(image.encoded, self._limits)

    def _decode(self, model: ServedModel, image: ImageInput) -> Image.Image:
        opened = self._open(model, image)
        assert model.info.preprocess is not None  # checked by _open
        return images.load(opened, model.info.preprocess.color)

    def _check_tensor(
        self, model: ServedModel, tensor: np.ndarray, window: tuple[int, ...] | None
    ) -> np.ndarray:
        spec = model.inputs[0]
        expected = spec.shape[1:]
        if tensor.ndim != len(expected):
            raise InvalidArgument(
                f"tensor shape {list(tensor.shape)} has rank {tensor.ndim}; "
                f"model '{model.name}' takes {list(expected)} per image"
            )
        if window is not None and any(
            w not in (-1, d) for w, d in zip(window, tensor.shape[1:], strict=True)
        ):
            raise InvalidArgument(
                f"tensor shape {list(tensor.shape)} does not match the "
                f"model's input {list(expected)}"
            )
        return tensor

    def _classify_tensor(
        self, model: ServedModel, image: ImageInput, opened: Image.Image | None
    ) -> np.ndarray:
        """The network's input for one image: a checked tensor, or ``opened`` decoded."""
        if opened is None:
            assert image.tensor is not None
            window = tuple(d for d in model.inputs[0].shape[2:])
            return self._check_tensor(model, image.tensor, window)
        info = model.info
        assert info.preprocess is not None  # checked when it was opened
        if info.window is None or len(info.window) != 2:
            raise InvalidArgument(f"model '{model.name}' does not describe a 2-D input window")
        try:
            decoded = images.load(opened, info.preprocess.color)
            try:
                return images.to_tensor(decoded, info.preprocess, (info.window[0], info.window[1]))
            finally:
                decoded.close()
        finally:
            opened.close()  # its pixels go now, not when the whole request is done

    async def _tensors(self, model: ServedModel, inputs: Sequence[ImageInput]) -> list[np.ndarray]:
        """Every image as the network's input: tiny ones here, the rest on decoding threads.

        Every header is read here first (each is read once), so a refused image costs no hop.
        """
        opened = [
            None if image.tensor is not None else self._open(model, image) for image in inputs
        ]
        self._check_request_size(model, inputs, opened)
        tiny = [o is None or o.width * o.height <= INLINE_PIXELS for o in opened]
        tensors = {
            index: self._classify_tensor(model, inputs[index], opened[index])
            for index in range(len(inputs))
            if tiny[index]
        }
        threaded = [index for index in range(len(inputs)) if not tiny[index]]
        if not threaded:
            return [tensors[index] for index in range(len(inputs))]
        # Started only now, so a tiny image's error above leaves no coroutine never awaited.
        done = await asyncio.gather(
            *(
                self._off_loop(self._classify_tensor, model, inputs[index], opened[index])
                for index in threaded
            )
        )
        tensors.update(zip(threaded, done, strict=True))
        return [tensors[index] for index in range(len(inputs))]

    def _check_request_size(
        self,
        model: ServedModel,
        inputs: Sequence[ImageInput],
        opened: Sequence[Image.Image | None],
    ) -> None:
        """Refuse a request whose images together are too much work, before decoding any.

        Each image passed its own limits; together they could still ask for the decoding of
        far more pixels, or (every image becoming a window-sized tensor, however small it
        was) far more input elements than one request may hold.
        """
        pixels = sum(o.width * o.height for o in opened if o is not None)
        if pixels > self._max_request_pixels:
            raise ResourceExhausted(
                f"the {len(inputs)} images hold {pixels} pixels together; the server decodes at "
                f"most {self._max_request_pixels} per request: send fewer images at a time"
            )
        per_image = math.prod(d for d in model.inputs[0].shape[1:] if d > 0)
        elements = sum(
            image.tensor.size if image.tensor is not None else per_image for image in inputs
        )
        if elements > self._max_elements:
            raise ResourceExhausted(
                f"the {len(inputs)} images make {elements} input elements; the server accepts "
                f"at most {self._max_elements} per request: send fewer images at a time"
            )

    async def _off_loop(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _off_loop_if(self, off: bool, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on a decoding thread if ``off``, else here on the loop."""
        return await self._off_loop(function, *args) if off else function(*args)

    # -- Classify -------------------------------------------------------------------------
    async def classify(
        self,
        name: str,
        version: str,
        inputs: Sequence[ImageInput],
        top_k: int,
        deadline: float | None,
        outcome: Outcome,
    ) -> tuple[ServedModel, list[list[Labelled]]]:
        """Top-k labels per image, in order."""
        model = self._classifier(name, version, outcome)
        if not inputs:
            raise InvalidArgument("no images in the request")
        # Decoding, then possibly several chunks: all on this version, even if a reload swaps
        # it out meanwhile.
        with _held(model):
            tensors = await self._tensors(model, inputs)
            _same_shape(tensors)
            # More images than max_batch_size become several requests to the same batcher.
            scores = await self._batched(model, np.stack(tensors), deadline, outcome)
        labels = _labels(model.info, scores.shape[1])
        k = top_k or DEFAULT_TOP_K
        return model, [_top(dense.softmax(row[:, None])[:, 0], k, labels) for row in scores]

    async def _run(
        self, model: ServedModel, batch: np.ndarray, deadline: float | None, outcome: Outcome
    ) -> np.ndarray:
        name = model.inputs[0].name
        request = InferenceRequest(
            model.name,
            str(model.version),
            "",
            {name: batch.astype(model.inputs[0].dtype, copy=False)},
        )
        _served, rows = await self._plane.infer(request, deadline, outcome, served=model)
        return rows[0]

    async def _batched(
        self,
        model: ServedModel,
        batch: np.ndarray,
        deadline: float | None,
        outcome: Outcome,
        slots: asyncio.Semaphore | None = None,
    ) -> np.ndarray:
        """Run more rows than one request may carry, as several requests of one model.

        One client request (every scale of a ClassifyDense included, through ``slots``) has at
        most ``CHUNKS_IN_FLIGHT`` of them queued at a time, so it neither fills the model's
        queue (turning other clients away) nor runs alone for long; the first that fails
        cancels the rest.
        """
        step = model.max_batch_size or 1
        if len(batch) <= step and slots is None:  # awaited in place: a task costs loop turns
            return await self._run(model, batch, deadline, outcome)
        shared = slots or asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def chunk(start: int) -> np.ndarray:
            async with shared:
                return await self._run(model, batch[start : start + step], deadline, outcome)

        return np.concatenate(await _all([chunk(i) for i in range(0, len(batch), step)]))

    # -- ClassifyDense --------------------------------------------------------------------
    def _check_query(self, query: DenseQuery) -> None:
        if not 1 <= query.divisor <= MAX_DIVISOR:
            raise InvalidArgument(f"stride_divisor must be 1..{MAX_DIVISOR}, got {query.divisor}")
        if not query.scales or any(not 0 < s <= MAX_SCALE for s in query.scales):
            raise InvalidArgument(
                f"scales must each be in (0, {MAX_SCALE:g}], got {list(query.scales)}"
            )
        if query.pool not in ("mean", "max") or query.mode not in ("dense", "crops"):
            raise InvalidArgument("pool must be mean or max, and mode dense or crops")

    def _plan(
        self, geometry: DenseGeometry, query: DenseQuery, size: tuple[int, ...], channels: int
    ) -> list[tuple[float, tuple[int, ...], tuple[int, ...]]]:
        """Per scale: (scale, scaled size, cell counts), all limits checked before any work.

        The limits: copies, cells, and the input elements the copies (dense) or the crops
        (crops mode) hold, which bounds the memory of a request before anything is resized;
        in dense mode also the pixels the network sees in one pass, since its activations
        grow with them (the demo's dense twin: about 400 bytes a pixel), while crops go
        through in batches of the model's size.
        """
        copies = len(query.scales) * query.divisor ** len(geometry.stride)
        if copies > self._max_copies:
            raise ResourceExhausted(
                f"{copies} shifted and scaled copies requested; the server "
                f"evaluates at most {self._max_copies}"
            )
        uneven = [s for s in geometry.stride if s % query.divisor]
        if uneven:
            raise InvalidArgument(
                f"stride {list(geometry.stride)} is not divisible by stride_divisor {query.divisor}"
            )
        plan, total, elements, pixels = [], 0, 0, 0
        for scale in query.scales:
            scaled = tuple(max(1, round(s * scale)) for s in size)
            if any(s < w for s, w in zip(scaled, geometry.window, strict=True)):
                raise InvalidArgument(
                    f"image {_size(scaled)} (at scale {scale:g}) is smaller than the model's "
                    f"window {_size(geometry.window)}"
                )
            counts = cell_counts(scaled, geometry.window, geometry.stride, query.divisor)
            cells = int(np.prod(counts))
            total += cells
            if query.mode == "crops":
                elements += cells * channels * int(np.prod(geometry.window))
            else:
                pixels += int(np.prod(scaled)) * query.divisor ** len(scaled)
            plan.append((scale, scaled, counts))
        elements += channels * pixels
        if pixels > self._max_dense_pixels:
            raise ResourceExhausted(
                f"the dense pass would take {pixels} pixels (every scale and shifted copy); the "
                f"server takes at most {self._max_dense_pixels}: send a smaller image or fewer "
                "copies, or use mode=crops"
            )
        if total > self._max_cells:
            raise ResourceExhausted(
                f"the request asks for {total} cells; the server computes at "
                f"most {self._max_cells} per request"
            )
        if elements > self._max_elements:
            raise ResourceExhausted(
                f"the request needs {elements} input elements ({query.mode} mode, every copy and "
                f"scale); the server takes at most {self._max_elements} (max_tensor_elements)"
            )
        return plan

    async def classify_dense(
        self,
        name: str,
        version: str,
        image: ImageInput,
        query: DenseQuery,
        deadline: float | None,
        outcome: Outcome,
    ) -> DenseResult:
        """The class-probability map of one image, and labels pooled over it."""
        self._check_query(query)
        classifier = self._classifier(name, version, outcome)
        twin = self._dense_twin(classifier, outcome) if query.mode == "dense" else None
        with _held(classifier, twin):  # every scale and chunk on these versions (see classify)
            return await self._dense_result(classifier, twin, image, query, deadline, outcome)

    async def _dense_result(
        self,
        classifier: ServedModel,
        twin: ServedModel | None,
        image: ImageInput,
        query: DenseQuery,
        deadline: float | None,
        outcome: Outcome,
    ) -> DenseResult:
        geometry = classifier.info.dense or (twin.info.dense if twin else None)
        if geometry is None:
            raise InvalidArgument(
                f"model '{classifier.name}' has no dense geometry in its metadata"
            )
        declared = classifier.inputs[0].shape[1] if len(classifier.inputs[0].shape) > 1 else 1
        channels = declared if declared > 0 else (classifier.info.channels or 3)
        if image.tensor is not None:
            if query.scales != (1.0,):  # refused before any scale's work starts
                raise InvalidArgument("scales other than 1 need an encoded image, not a tensor")
            decoded, tensor = None, self._check_tensor(classifier, image.tensor, None)
            if tensor.shape[0] != channels:  # the plan's limits count the model's channels
                raise InvalidArgument(
                    f"tensor shape {list(tensor.shape)} has {tensor.shape[0]} channels; model "
                    f"'{classifier.name}' takes {channels}"
                )
            size = tuple(tensor.shape[1:])
        else:
            decoded = await self._off_loop(self._decode, classifier, image)
            tensor, size = None, (decoded.height, decoded.width)
        plan = self._plan(geometry, query, size, channels)
        slots = asyncio.Semaphore(CHUNKS_IN_FLIGHT)  # shared by every scale of this request
        maps = await _all(
            [
                self._scale_map(
                    classifier,
                    twin,
                    geometry,
                    query,
                    decoded,
                    tensor,
                    scale,
                    counts,
                    deadline,
                    outcome,
                    slots,
                )
                for scale, _scaled, counts in plan
            ]
        )
        cells = sum(int(np.prod(counts)) for _s, _z, counts in plan)
        metrics.DENSE_CELLS.labels((twin or classifier).name).inc(cells)
        labels = _labels(classifier.info, maps[0].shape[0])
        pooled = dense.pool(maps, query.pool)
        top = _top(pooled, query.top_k or DEFAULT_TOP_K, labels)
        stride = tuple(s // query.divisor for s in geometry.stride)
        first_scale, _size, first_counts = plan[0]
        starts = cell_starts(
            first_counts, geometry.stride, query.divisor, geometry.offset, first_scale
        )
        window = [round(w / first_scale) for w in geometry.window]
        located = []
        for entry, cell in zip(top, dense.best_cells(maps[0], [t.index for t in top]), strict=True):
            begin = [starts[axis][i] for axis, i in enumerate(cell)]
            box = _box(begin, window)
            located.append(Labelled(entry.label, entry.index, entry.probability, cell, box))
        return DenseResult(
            twin or classifier,
            geometry if query.mode == "dense" else _exact(geometry),
            stride,
            located,
            maps[0] if query.return_map else None,
            starts,
            cells,
            query.scales,
        )

    async def _scale_map(
        self,
        classifier: ServedModel,
        twin: ServedModel | None,
        geometry: DenseGeometry,
        query: DenseQuery,
        decoded: Image.Image | None,
        tensor: np.ndarray | None,
        scale: float,
        counts: tuple[int, ...],
        deadline: float | None,
        outcome: Outcome,
        slots: asyncio.Semaphore,
    ) -> np.ndarray:
        if decoded is not None:
            assert classifier.info.preprocess is not None
            scaled = await self._off_loop(_prepare, decoded, scale, classifier.info)
        else:
            assert tensor is not None and scale == 1.0  # checked in classify_dense
            scaled = tensor
        # Copies and crops of a large image take the loop for seconds (a 1030x1030 image's
        # 262,144 windows: 2.7 s): off it, like decoding, where they are more than tiny.
        big = scaled.size * query.divisor ** len(geometry.stride) > INLINE_ELEMENTS
        if twin is not None:
            copies = (
                scaled[None]
                if query.divisor == 1
                else await self._off_loop_if(
                    big, dense.shifted_copies, scaled, geometry.stride, query.divisor
                )
            )
            scores = await self._batched(twin, copies, deadline, outcome, slots)
            return dense.softmax(
                dense.interleave(scores, query.divisor, counts)
                if query.divisor > 1
                else scores[0][(slice(None), *(slice(0, c) for c in counts))]
            )
        windows = await self._off_loop_if(
            big, dense.crops, scaled, geometry.window, geometry.stride, query.divisor, counts
        )
        scores = await self._batched(classifier, windows, deadline, outcome, slots)  # [cells, K]
        return dense.softmax(np.ascontiguousarray(scores.T).reshape(scores.shape[1], *counts))


def _prepare(image: Image.Image, scale: float, info: ModelInfo) -> np.ndarray:
    assert info.preprocess is not None
    return images.to_tensor(images.resize(image, scale), info.preprocess)


def _box(begin: Sequence[int], window: Sequence[int]) -> tuple[int, ...]:
    if len(begin) == 2:  # [x0, y0, x1, y1]
        return (begin[1], begin[0], begin[1] + window[1], begin[0] + window[0])
    return (begin[0], begin[0] + window[0])


def _exact(geometry: DenseGeometry) -> DenseGeometry:
    return DenseGeometry(
        geometry.stride, geometry.window, geometry.offset, geometry.receptive_field, True, 0.0, 1.0
    )


def _size(shape: Sequence[int]) -> str:
    """Width x height, as people write image sizes."""
    return "x".join(map(str, reversed(shape)))
