"""The plan of one ClassifyDense request: every scale's size and cells, checked before any work.

A :class:`DensePlan` is built once per request, from the query, the models that evaluate it,
their geometry and the image's size. Building it checks every limit (shifted and scaled copies,
cells, the pixels of the dense pass, the input elements of every copy or crop, the answer's size
and the request's peak memory, see :mod:`service.classification.budget`), so a request over any
of them is refused before anything is resized, copied or run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_format import DenseGeometry, cell_counts
from model_format.map_size import MAP_FORMATS
from service.classification import budget
from service.classification.labels import DEFAULT_TOP_K
from service.core.errors import InvalidArgument, ResourceExhausted
from service.core.settings import Settings
from service.engine.repository import ServedModel

__all__ = ["MAX_DIVISOR", "MAX_SCALE", "DenseLimits", "DensePlan", "DenseQuery", "DenseTarget"]

MAX_DIVISOR = 8
MAX_SCALE = 4.0


@dataclass(frozen=True)
class DenseQuery:
    """The options of one ClassifyDense request."""

    top_k: int = DEFAULT_TOP_K
    divisor: int = 1
    scales: tuple[float, ...] = (1.0,)
    pool: str = "mean"
    mode: str = "dense"
    return_map: bool = True
    map_format: str = "fp32"

    @property
    def k(self) -> int:
        """The labels answered, and the classes per cell of a top-k map."""
        return self.top_k or DEFAULT_TOP_K

    def check(self) -> None:
        """Refuse options outside their ranges, before any model is looked up.

        Raises:
            InvalidArgument: the stride divisor, a scale, the pool, the mode or the map format
                is unknown.
        """
        if not 1 <= self.divisor <= MAX_DIVISOR:
            raise InvalidArgument(f"stride_divisor must be 1..{MAX_DIVISOR}, got {self.divisor}")
        if not self.scales or any(not 0 < s <= MAX_SCALE for s in self.scales):
            raise InvalidArgument(
                f"scales must each be in (0, {MAX_SCALE:g}], got {list(self.scales)}"
            )
        if self.pool not in ("mean", "max") or self.mode not in ("dense", "crops"):
            raise InvalidArgument("pool must be mean or max, and mode dense or crops")
        if self.map_format not in MAP_FORMATS:
            raise InvalidArgument(f"map_format must be one of {', '.join(MAP_FORMATS)}")


@dataclass(frozen=True)
class DenseLimits:
    """What one ClassifyDense request may ask for.

    The dense pass's pixels may be capped (0: no cap of their own); its memory, activations
    included, is bounded by ``memory_bytes`` (``bytes_per_pixel`` 0: the estimate, see
    :mod:`service.classification.budget`); crops go through in batches of the model's size, so
    only their input elements count. The answer is bounded by ``response_bytes``.
    """

    copies: int
    cells: int
    pixels: int
    elements: int
    response_bytes: int = 4 << 20
    memory_bytes: int = 1 << 30
    bytes_per_pixel: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> DenseLimits:
        """The limits the server was started with."""
        return cls(
            copies=settings.max_dense_copies,
            cells=settings.max_map_cells,
            pixels=settings.max_dense_pixels,
            elements=settings.max_tensor_elements,
            response_bytes=settings.max_response_bytes,
            memory_bytes=settings.dense_memory_bytes,
            bytes_per_pixel=settings.dense_bytes_per_pixel,
        )


@dataclass(frozen=True)
class DenseTarget:
    """What evaluates a map: the classifier, its dense twin (dense mode), their geometry.

    ``classes`` (0: unknown) and ``label_bytes`` (the longest label) size the answer; ``batch``
    is the most rows one pass of the model that evaluates the map takes.
    """

    classifier: ServedModel
    twin: ServedModel | None
    geometry: DenseGeometry
    channels: int
    classes: int = 0
    label_bytes: int = 0
    batch: int = 1

    @classmethod
    def of(cls, classifier: ServedModel, twin: ServedModel | None) -> DenseTarget:
        """The target of ``classifier`` and ``twin``, with the geometry their metadata holds.

        Raises:
            InvalidArgument: neither model describes its dense geometry.
        """
        geometry = classifier.info.dense or (twin.info.dense if twin else None)
        if geometry is None:
            raise InvalidArgument(
                f"model '{classifier.name}' has no dense geometry in its metadata"
            )
        shape = classifier.inputs[0].shape
        declared = shape[1] if len(shape) > 1 else 1
        channels = declared if declared > 0 else (classifier.info.channels or 3)
        labels = classifier.info.labels or ()
        return cls(
            classifier,
            twin,
            geometry,
            channels,
            _classes(classifier, twin) or len(labels),
            max((len(label.encode()) for label in labels), default=10),
            (twin or classifier).max_batch_size or 1,
        )


@dataclass(frozen=True)
class ScalePass:
    """One scale of a request: the image's size at that scale and its cells per axis."""

    scale: float
    size: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def cells(self) -> int:
        """The cells of this scale's map."""
        return int(np.prod(self.counts))


@dataclass(frozen=True)
class DensePlan:
    """Everything one ClassifyDense request computes, sized and checked (see the module)."""

    target: DenseTarget
    query: DenseQuery
    size: tuple[int, ...]
    deadline: float | None
    passes: tuple[ScalePass, ...]
    cells: int
    pixels: int
    elements: int
    rows: tuple[int, ...] = ()
    answer_bytes: int = 0

    @property
    def geometry(self) -> DenseGeometry:
        """The model's dense geometry."""
        return self.target.geometry

    @property
    def stride(self) -> tuple[int, ...]:
        """The stride of the map answered: the model's, divided by the stride divisor."""
        return tuple(s // self.query.divisor for s in self.geometry.stride)

    @property
    def copies(self) -> int:
        """Shifted copies per scale: the stride divisor to the power of the spatial axes."""
        return int(self.query.divisor ** len(self.geometry.stride))

    @classmethod
    def build(
        cls,
        target: DenseTarget,
        query: DenseQuery,
        size: tuple[int, ...],
        deadline: float | None,
        limits: DenseLimits,
    ) -> DensePlan:
        """The plan for an image of ``size`` (height, width), every limit checked.

        Raises:
            ResourceExhausted: too many copies, cells, dense-pass pixels or input elements, an
                answer too large, or more memory than one request may take.
            InvalidArgument: the stride is not divisible by the divisor, or a scaled image is
                smaller than the model's window.
        """
        geometry = target.geometry
        copies = len(query.scales) * query.divisor ** len(geometry.stride)
        if copies > limits.copies:
            raise ResourceExhausted(
                f"{copies} shifted and scaled copies requested; the server "
                f"evaluates at most {limits.copies}"
            )
        if any(s % query.divisor for s in geometry.stride):
            raise InvalidArgument(
                f"stride {list(geometry.stride)} is not divisible by stride_divisor {query.divisor}"
            )
        passes = tuple(_scale_pass(geometry, query, size, scale) for scale in query.scales)
        cells = sum(p.cells for p in passes)
        if query.mode == "crops":
            pixels = 0
            elements = cells * target.channels * int(np.prod(geometry.window))
        else:
            pixels = sum(int(np.prod(p.size)) * query.divisor ** len(p.size) for p in passes)
            elements = target.channels * pixels
        if limits.pixels and pixels > limits.pixels:
            raise ResourceExhausted(
                f"the dense pass would take {pixels} pixels (every scale and shifted copy); the "
                f"server takes at most {limits.pixels}: send a smaller image or fewer "
                "copies, or use mode=crops"
            )
        if cells > limits.cells:
            raise ResourceExhausted(
                f"the request asks for {cells} cells; the server computes at "
                f"most {limits.cells} per request"
            )
        if elements > limits.elements:
            raise ResourceExhausted(
                f"the request needs {elements} input elements ({query.mode} mode, every copy and "
                f"scale); the server takes at most {limits.elements} (max_tensor_elements)"
            )
        answer = budget.answer_bytes(target, query, passes[0], query.k)
        budget.check_answer(answer, passes[0], query, limits)
        rows = budget.runtime_rows(target, query, size, passes, answer, limits)
        return cls(target, query, size, deadline, passes, cells, pixels, elements, rows, answer)


def _scale_pass(
    geometry: DenseGeometry, query: DenseQuery, size: tuple[int, ...], scale: float
) -> ScalePass:
    """The size and cells of one scale, refusing an image the window does not fit in."""
    scaled = tuple(max(1, round(s * scale)) for s in size)
    if any(s < w for s, w in zip(scaled, geometry.window, strict=True)):
        raise InvalidArgument(
            f"image {_size(scaled)} (at scale {scale:g}) is smaller than the model's "
            f"window {_size(geometry.window)}"
        )
    counts = cell_counts(scaled, geometry.window, geometry.stride, query.divisor)
    return ScalePass(scale, scaled, counts)


def _classes(classifier: ServedModel, twin: ServedModel | None) -> int:
    """The classes of a map: the classifier's scores a row, or the twin's channels (0: unknown)."""
    scores = classifier.outputs[0].shape
    if len(scores) == 2 and scores[1] > 0:
        return scores[1]
    maps = twin.outputs[0].shape if twin is not None else ()
    return maps[1] if len(maps) > 2 and maps[1] > 0 else 0


def _size(shape: Sequence[int]) -> str:
    """Width x height, as people write image sizes."""
    return "x".join(map(str, reversed(shape)))
