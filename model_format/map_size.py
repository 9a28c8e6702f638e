"""How large a dense map is, from the geometry alone: known before anything is computed.

A map of ``K`` classes over ``cells`` cells takes, per cell, ``4 K`` bytes as float32, ``2 K``
as float16, or, in top-k form, ``k`` class indices (one byte each for up to 256 classes, else
two) and ``k`` float16 probabilities. Servers size an answer with these before they compute it,
so one too large for the client is refused up front instead of failing on the client after all
the work: ClassifyDense through the classification API, and a dense twin's own output
(``[N, K, *cells]`` float32) through KServe v2 with :func:`twin_output_bytes`.

The memory of one pass of a dense twin grows with its input pixels too
(:func:`twin_pass_bytes`): its input, and the activations inside the network, which an
operator may know better than :data:`ESTIMATED_BYTES_PER_PIXEL`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from model_format import DenseGeometry, cell_counts

__all__ = [
    "ESTIMATED_BYTES_PER_PIXEL",
    "MAP_FORMATS",
    "class_index_bytes",
    "map_bytes",
    "twin_output_bytes",
    "twin_output_cells",
    "twin_pass_bytes",
]

MAP_FORMATS = ("fp32", "fp16", "top_k")
"""How a map may be carried: every class as float32 or float16, or the top k classes per cell."""


ESTIMATED_BYTES_PER_PIXEL = 512
"""Activations per input pixel of a dense pass, when nothing better is known: two float32
layers of 64 channels at full resolution alive at once (a layer's input and output). Networks
that stride early (most ImageNet ones) take far less; one that keeps more channels at full
resolution takes more."""


def class_index_bytes(classes: int) -> int:
    """Bytes of one class index in top-k form: uint8 up to 256 classes, else uint16."""
    return 1 if classes <= 256 else 2


def map_bytes(counts: Sequence[int], classes: int, map_format: str = "fp32", k: int = 1) -> int:
    """Bytes of a map of ``counts`` cells per axis and ``classes`` classes, in ``map_format``.

    ``k`` counts only in top-k form, where it is at most ``classes``.

    Raises:
        ValueError: ``map_format`` is not one of :data:`MAP_FORMATS`.
    """
    cells = math.prod(counts)
    if map_format == "fp32":
        return cells * classes * 4
    if map_format == "fp16":
        return cells * classes * 2
    if map_format == "top_k":
        return cells * min(k, classes) * (class_index_bytes(classes) + 2)
    raise ValueError(f"map format must be one of {', '.join(MAP_FORMATS)}, got {map_format!r}")


def twin_output_cells(size: Sequence[int], geometry: DenseGeometry) -> tuple[int, ...]:
    """Cells per axis that a dense twin outputs for an input of ``size``, at most.

    The cells a map keeps (:func:`model_format.cell_counts`); a network with padding may output
    up to one cell per stride of the input instead, so the larger of the two counts.
    """
    kept = cell_counts(size, geometry.window, geometry.stride)
    return tuple(max(c, -(-s // st)) for c, s, st in zip(kept, size, geometry.stride, strict=True))


def twin_output_bytes(
    batch: int, size: Sequence[int], geometry: DenseGeometry, classes: int, itemsize: int = 4
) -> int:
    """Bytes of a dense twin's output for ``batch`` inputs of ``size``: ``[N, K, *cells]``.

    An upper bound (see :func:`twin_output_cells`), for refusing a KServe v2 request whose
    answer would exceed what the client accepts before the twin runs.
    """
    return batch * classes * itemsize * math.prod(twin_output_cells(size, geometry))


def twin_pass_bytes(
    batch: int, size: Sequence[int], channels: int, bytes_per_pixel: int = 0
) -> int:
    """Memory of one dense-twin pass over ``batch`` inputs of ``size``: float32 input, activations.

    ``bytes_per_pixel``: the network's activations per input pixel (0:
    :data:`ESTIMATED_BYTES_PER_PIXEL`).
    """
    per_pixel = 4 * channels + (bytes_per_pixel or ESTIMATED_BYTES_PER_PIXEL)
    return batch * math.prod(size) * per_pixel
