"""ClassifyDense: the class-probability map of one image, and labels pooled over it.

In dense mode the dense twin (``<name>_dense``) evaluates the whole image in one pass per
shifted copy; in crops mode the classifier evaluates every window. Either way the request reads
top to bottom: check the query, look the models up, read the image, plan every scale (every
limit checked there), run each scale's pass, pool the maps, answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model_format import DenseGeometry, ModelInfo, cell_starts
from service.classification import dense, images
from service.classification.chunks import ChunkedInference, all_of, held
from service.classification.inputs import ImageInput, ImageInputs, check_tensor
from service.classification.labels import DEFAULT_TOP_K, Labelled, labels_of, top
from service.classification.lookup import ModelLookup, ModelRef
from service.classification.plan import DenseLimits, DensePlan, DenseQuery, DenseTarget, ScalePass
from service.core.errors import InvalidArgument
from service.engine import metrics
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["INLINE_ELEMENTS", "ClassifyDense", "DenseResult"]

INLINE_ELEMENTS = 64 * 64
"""Images of up to this many elements (times the shifted copies) are copied or cropped on the
event loop; larger ones on the decoding threads, since a large image's copies and crops would
hold the loop for long."""

Source = Image.Image | np.ndarray
"""A request's image: decoded (scaled and preprocessed per scale), or a preprocessed tensor."""


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
        with held(classifier, twin):  # every scale and chunk on these versions
            target = DenseTarget.of(classifier, twin)
            source = await self._source(target, image, query)
            size = tuple(source.shape[1:]) if isinstance(source, np.ndarray) else _size(source)
            plan = DensePlan.build(target, query, size, deadline, self._limits)
            chunks = ChunkedInference(self._plane, deadline, outcome, shared=True)
            maps = await all_of([self._scale_map(plan, p, source, chunks) for p in plan.passes])
            metrics.DENSE_CELLS.labels((twin or classifier).name).inc(plan.cells)
            return _result(plan, maps)

    async def _source(self, target: DenseTarget, image: ImageInput, query: DenseQuery) -> Source:
        """The image: a checked tensor, or decoded on a decoding thread."""
        if image.tensor is None:
            return await self._inputs.off_loop(self._inputs.decode, target.classifier, image)
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
        self, plan: DensePlan, scale: ScalePass, source: Source, chunks: ChunkedInference
    ) -> np.ndarray:
        """``[K, *cells]`` class probabilities at one scale."""
        target, geometry, divisor = plan.target, plan.geometry, plan.query.divisor
        if isinstance(source, np.ndarray):
            assert scale.scale == 1.0  # a tensor takes no other scale (checked in _source)
            scaled = source
        else:
            info = target.classifier.info
            scaled = await self._inputs.off_loop(_prepare, source, scale.scale, info)
        # Copies and crops of a large image would take the loop for long: off it, like
        # decoding, where they are more than tiny.
        big = scaled.size * plan.copies > INLINE_ELEMENTS
        if target.twin is not None:
            copies = (
                scaled[None]
                if divisor == 1
                else await self._inputs.off_loop_if(
                    big, dense.shifted_copies, scaled, geometry.stride, divisor
                )
            )
            scores = await chunks.rows(target.twin, copies)
            return dense.softmax(dense.twin_map(scores, divisor, scale.counts))
        windows = await self._inputs.off_loop_if(
            big, dense.crops, scaled, geometry.window, geometry.stride, divisor, scale.counts
        )
        scores = await chunks.rows(target.classifier, windows)  # [cells, K]
        return dense.softmax(dense.crops_map(scores, scale.counts))


def _result(plan: DensePlan, maps: Sequence[np.ndarray]) -> DenseResult:
    """The answer: labels pooled over every scale, located on the first scale's map."""
    target, geometry, query = plan.target, plan.geometry, plan.query
    labels = labels_of(target.classifier.info, maps[0].shape[0])
    ranked = top(dense.pool(maps, query.pool), query.top_k or DEFAULT_TOP_K, labels)
    first = plan.passes[0]
    starts = cell_starts(first.counts, geometry.stride, query.divisor, geometry.offset, first.scale)
    window = [round(w / first.scale) for w in geometry.window]
    located = []
    for entry, cell in zip(
        ranked, dense.best_cells(maps[0], [t.index for t in ranked]), strict=True
    ):
        begin = [starts[axis][i] for axis, i in enumerate(cell)]
        box = dense.box(begin, window)
        located.append(Labelled(entry.label, entry.index, entry.probability, cell, box))
    return DenseResult(
        target.twin or target.classifier,
        geometry if query.mode == "dense" else _exact(geometry),
        plan.stride,
        located,
        maps[0] if query.return_map else None,
        starts,
        plan.cells,
        query.scales,
    )


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
