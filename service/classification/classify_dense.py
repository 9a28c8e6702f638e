"""ClassifyDense: the class-probability map of one image, and labels pooled over it.

In dense mode the dense twin (``<name>_dense``) evaluates the whole image in one pass per
shifted copy; in crops mode the classifier evaluates every window. Either way the request reads
top to bottom: check the query, look the models up, read the image, plan every scale (every
limit checked there, the answer's size and the request's memory too), run each scale's passes,
pool the maps, answer in the requested map format.

The scales run one after the other and each keeps only what pooling needs (the first scale's
map, which the answer carries, and every scale's pooled vector), so a request's memory is that
of its largest scale, as its plan counted it. A scale's shifted copies are made pass by pass, as
many per pass as the plan allows, and its crops chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model_format import DenseGeometry, ModelInfo, cell_starts
from service.classification import dense, images
from service.classification.chunks import ChunkedInference, held
from service.classification.inputs import ImageInput, ImageInputs, check_tensor
from service.classification.labels import Labelled, labels_of, top
from service.classification.lookup import ModelLookup, ModelRef
from service.classification.plan import DenseLimits, DensePlan, DenseQuery, DenseTarget
from service.core.errors import InvalidArgument
from service.engine import metrics
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["INLINE_ELEMENTS", "ClassifyDense", "DenseResult"]

INLINE_ELEMENTS = 64 * 64
"""Images of up to this many elements (times the shifted copies) are copied or cropped on the
event loop, and maps of up to this many values are finished there; larger ones on the decoding
threads, since their copies, crops and arithmetic would hold the loop for long."""

Source = Image.Image | np.ndarray
"""A request's image: decoded (scaled and preprocessed per scale), or a preprocessed tensor."""


@dataclass
class DenseResult:
    """What ClassifyDense answers.

    ``probabilities`` is the first scale's map in ``map_format`` (float32 or float16
    ``[K, *cells]``, or the top-k probabilities ``[k, *cells]`` beside ``top_classes``), or None
    when the query asked for no map.
    """

    model: ServedModel
    geometry: DenseGeometry
    stride: tuple[int, ...]
    top: list[Labelled]
    probabilities: np.ndarray | None
    starts: list[list[int]]
    cells: int
    scales: tuple[float, ...] = field(default=(1.0,))
    map_format: str = "fp32"
    top_classes: np.ndarray | None = None
    classes: int = 0


class ClassifyDense:
    """The ClassifyDense call (see the module docstring)."""

    def __init__(
        self, lookup: ModelLookup, inputs: ImageInputs, plane: DataPlane, limits: DenseLimits
    ) -> None:
        self._lookup = lookup
        self._inputs = inputs
        self._plane = plane
        self._limits = limits

    async def run(
        self,
        ref: ModelRef,
        image: ImageInput,
        query: DenseQuery,
        deadline: float | None,
        outcome: Outcome,
    ) -> DenseResult:
        """The class-probability map of ``image``, and labels pooled over it."""
        query.check()
        classifier = self._lookup.classifier(ref, outcome)
        twin = self._lookup.dense_twin(classifier, outcome) if query.mode == "dense" else None
        with held(outcome, deadline, classifier, twin):  # every scale and chunk on these versions
            target = DenseTarget.of(classifier, twin)
            # The size from the header (or the tensor): the plan refuses before any decoding.
            source = self._source(target, image, query)
            size = tuple(source.shape[1:]) if isinstance(source, np.ndarray) else _size(source)
            plan = DensePlan.build(target, query, size, deadline, self._limits)
            if not isinstance(source, np.ndarray):
                source = await self._inputs.off_loop(self._inputs.load, classifier, source)
            chunks = ChunkedInference(self._plane, deadline, outcome)
            first: np.ndarray | None = None
            pooled = []
            for index in range(len(plan.passes)):  # one at a time: the memory of one scale
                probabilities = await self._scale_map(plan, index, source, chunks)
                pooled.append(dense.pool_cells(probabilities, query.pool))
                first = probabilities if first is None else first
            metrics.DENSE_CELLS.labels((twin or classifier).name).inc(plan.cells)
            assert first is not None  # a plan has a pass per scale, and at least one scale
            big = first.size > INLINE_ELEMENTS
            return await self._inputs.off_loop_if(big, _result, plan, first, pooled)

    def _source(self, target: DenseTarget, image: ImageInput, query: DenseQuery) -> Source:
        """The image: a checked tensor, or an encoded image's header (nothing decoded yet)."""
        if image.tensor is None:
            return self._inputs.open(target.classifier, image)
        if query.scales != (1.0,):  # refused before any scale's work starts
            raise InvalidArgument("scales other than 1 need an encoded image, not a tensor")
        tensor = check_tensor(target.classifier, image.tensor, None)
        if tensor.shape[0] != target.channels:  # the plan's limits count the model's channels
            raise InvalidArgument(
                f"tensor shape {list(tensor.shape)} has {tensor.shape[0]} channels; model "
                f"'{target.classifier.name}' takes {target.channels}"
            )
        return tensor

    async def _scale_map(
        self, plan: DensePlan, index: int, source: Source, chunks: ChunkedInference
    ) -> np.ndarray:
        """``[K, *cells]`` class probabilities at the plan's scale ``index``."""
        target, geometry, divisor = plan.target, plan.geometry, plan.query.divisor
        scale = plan.passes[index]
        if isinstance(source, np.ndarray):
            assert scale.scale == 1.0  # a tensor takes no other scale (checked in _source)
            scaled = source
        else:
            info = target.classifier.info
            scaled = await self._inputs.off_loop(_prepare, source, scale.scale, info)
        if target.twin is not None:
            rows = plan.rows[index]
            big = scaled.size * rows > INLINE_ELEMENTS

            async def copies(start: int, stop: int) -> np.ndarray:
                if divisor == 1:
                    return scaled[None]
                return await self._inputs.off_loop_if(
                    big, dense.shifted_copies, scaled, geometry.stride, divisor, range(start, stop)
                )

            # One pass at a time: the plan counts the copies of one pass (the batcher keeps a
            # batch that joins passes of several requests within the budget by itself).
            parts = await chunks.stream(target.twin, plan.copies, copies, rows, in_flight=1)
            maps = [copy for part in parts for copy in part]
            big = scaled.size * plan.copies > INLINE_ELEMENTS
            return await self._inputs.off_loop_if(big, _twin_map, maps, divisor, scale.counts)
        model = target.classifier
        step = model.max_batch_size or 1
        window = geometry.window
        small = scaled.shape[0] * int(np.prod(window)) * step <= INLINE_ELEMENTS

        async def crops(start: int, stop: int) -> np.ndarray:
            return await self._inputs.off_loop_if(
                not small,
                dense.crops,
                scaled,
                window,
                geometry.stride,
                divisor,
                scale.counts,
                range(start, stop),
            )

        parts = await chunks.stream(model, scale.cells, crops)
        scores = np.concatenate(parts)  # [cells, K]
        big = scores.size > INLINE_ELEMENTS
        return await self._inputs.off_loop_if(big, _crops_map, scores, scale.counts)


def _twin_map(maps: Sequence[np.ndarray], divisor: int, counts: Sequence[int]) -> np.ndarray:
    """A scale's probabilities from its copies' twin outputs.

    The softmax runs in place: the scores are this request's own rows of the twin's output (or
    their interleaving), which nothing else reads, so a large map needs no second copy.
    """
    scores = np.ascontiguousarray(dense.twin_map(maps, divisor, counts), np.float32)
    return dense.softmax(scores, in_place=True)


def _crops_map(scores: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """A scale's probabilities from the classifier's ``[cells, K]`` rows."""
    return dense.softmax(np.ascontiguousarray(dense.crops_map(scores, counts), np.float32), True)


def _result(plan: DensePlan, first: np.ndarray, pooled: Sequence[np.ndarray]) -> DenseResult:
    """The answer: labels pooled over every scale, located on the first scale's map."""
    target, geometry, query = plan.target, plan.geometry, plan.query
    classes = first.shape[0]
    labels = labels_of(target.classifier.info, classes)
    ranked = top(dense.pool_scales(pooled, query.pool), query.k, labels)
    scale = plan.passes[0]
    starts = cell_starts(scale.counts, geometry.stride, query.divisor, geometry.offset, scale.scale)
    window = [round(w / scale.scale) for w in geometry.window]
    located = []
    for entry, cell in zip(ranked, dense.best_cells(first, [t.index for t in ranked]), strict=True):
        begin = [starts[axis][i] for axis, i in enumerate(cell)]
        box = dense.box(begin, window)
        located.append(Labelled(entry.label, entry.index, entry.probability, cell, box))
    probabilities, top_classes = _formatted(first, query) if query.return_map else (None, None)
    return DenseResult(
        target.twin or target.classifier,
        geometry if query.mode == "dense" else _exact(geometry),
        plan.stride,
        located,
        probabilities,
        starts,
        plan.cells,
        query.scales,
        query.map_format,
        top_classes,
        classes,
    )


def _formatted(
    probabilities: np.ndarray, query: DenseQuery
) -> tuple[np.ndarray, np.ndarray | None]:
    """The map in the query's format: its probabilities, and the classes of a top-k map."""
    if query.map_format == "top_k":
        classes, values = dense.top_per_cell(probabilities, query.k)
        return values, classes
    if query.map_format == "fp16":
        return probabilities.astype(np.float16), None
    return probabilities, None


def _prepare(image: Image.Image, scale: float, info: ModelInfo) -> np.ndarray:
    """The network's input for ``image`` resized by ``scale``."""
    assert info.preprocess is not None
    return images.to_tensor(images.resize(image, scale), info.preprocess)


def _size(image: Image.Image) -> tuple[int, ...]:
    """Height and width, the axes' order of maps and windows."""
    return (image.height, image.width)


def _exact(geometry: DenseGeometry) -> DenseGeometry:
    """``geometry`` as crops mode evaluates it: every cell exactly its window's evaluation."""
    return DenseGeometry(
        geometry.stride, geometry.window, geometry.offset, geometry.receptive_field, True, 0.0, 1.0
    )
