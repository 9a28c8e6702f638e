"""Dense evaluation arithmetic: shifted copies, interleaving, crops and pooling.

Cell ``j`` along an axis of a map with stride divisor ``d`` stands for the crop starting at
``offset + j * stride / d``; an input ``W`` wide has ``(W - window) * d // stride + 1`` cells.
With ``d > 1`` the image is evaluated as ``d**n`` copies shifted by multiples of ``stride / d``
(zero-padded at the far end so all copies share one size and form one batch); copy ``k``'s cell
``i`` is cell ``i * d + k`` of the final map. Cells whose window would reach into that padding lie
beyond the cell count and are cut off, so every kept cell is exactly its crop's evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "best_cells",
    "box",
    "crops",
    "crops_map",
    "interleave",
    "pool",
    "pool_cells",
    "pool_scales",
    "shifted_copies",
    "softmax",
    "top_per_cell",
    "twin_map",
]

TOP_BLOCK_CELLS = 1 << 16
"""Cells ranked at a time by :func:`top_per_cell`: its temporaries stay small for any map."""


def _shifts(stride: Sequence[int], divisor: int) -> list[tuple[int, ...]]:
    return list(itertools.product(*([k * st // divisor for k in range(divisor)] for st in stride)))


def shifted_copies(
    image: np.ndarray, stride: Sequence[int], divisor: int, which: range | None = None
) -> np.ndarray:
    """``[d**n, C, *size]``: the image shifted by every multiple of ``stride / d``, row-major.

    ``which``: only those copies (by index), so a pass's copies are made when it runs.
    """
    shifts = _shifts(stride, divisor)
    which = which if which is not None else range(len(shifts))
    copies = np.zeros((len(which), *image.shape), dtype=image.dtype)
    for index, shift in enumerate(shifts[k] for k in which):
        source: tuple[Any, ...] = (slice(None), *(slice(s, None) for s in shift))
        target: tuple[Any, ...] = (
            index,
            slice(None),
            *(slice(0, n - s) for n, s in zip(image.shape[1:], shift, strict=True)),
        )
        copies[target] = image[source]
    return copies


def interleave(maps: Sequence[np.ndarray], divisor: int, counts: Sequence[int]) -> np.ndarray:
    """``[K, *counts]`` from the ``[K, *cells]`` maps of the copies of :func:`shifted_copies`.

    ``maps`` is indexed by copy (an array ``[d**n, K, *cells]`` or a list of ``[K, *cells]``);
    each copy's cells are written straight to their places, every ``d``-th cell of the map.
    """
    first = maps[0]
    merged = np.empty((first.shape[0], *counts), dtype=first.dtype)
    offsets = itertools.product(*(range(divisor) for _ in counts))
    for copy, offset in zip(maps, offsets, strict=True):
        lengths = [len(range(k, c, divisor)) for k, c in zip(offset, counts, strict=True)]
        target = (slice(None), *(slice(k, None, divisor) for k in offset))
        merged[target] = copy[(slice(None), *(slice(0, n) for n in lengths))]
    return merged


def crops(
    image: np.ndarray,
    window: Sequence[int],
    stride: Sequence[int],
    divisor: int,
    counts: Sequence[int],
    which: range | None = None,
) -> np.ndarray:
    """``[cells, C, *window]``: every cell's window (or those in ``which``), row-major order."""
    step = [st // divisor for st in stride]
    every = itertools.product(*(range(c) for c in counts))
    positions = every if which is None else itertools.islice(every, which.start, which.stop)
    windows = [
        image[
            (
                slice(None),
                *(slice(i * s, i * s + w) for i, s, w in zip(position, step, window, strict=True)),
            )
        ]
        for position in positions
    ]
    return np.stack(windows)


def twin_map(scores: Sequence[np.ndarray], divisor: int, counts: Sequence[int]) -> np.ndarray:
    """``[K, *counts]`` scores from the dense twin's ``[d**n, K, *cells]`` output (by copy).

    One copy (``d == 1``) is cut to ``counts``; several are interleaved (:func:`interleave`).
    """
    if divisor > 1:
        return interleave(scores, divisor, counts)
    cut: np.ndarray = scores[0][(slice(None), *(slice(0, c) for c in counts))]
    return cut


def crops_map(scores: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """``[K, *counts]`` scores from the classifier's ``[cells, K]`` rows of :func:`crops`."""
    return np.ascontiguousarray(scores.T).reshape(scores.shape[1], *counts)


def softmax(scores: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Softmax over axis 0 (the classes), computed stably in float32.

    ``in_place``: into ``scores`` itself (a float32 array the caller owns), so a large map
    needs no second copy.
    """
    if in_place and scores.dtype == np.float32 and scores.flags.writeable:
        scores -= scores.max(axis=0, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=0, keepdims=True)
        return scores
    shifted = scores - scores.max(axis=0, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    result: np.ndarray = exp / exp.sum(axis=0, keepdims=True)
    return result


def pool_cells(probabilities: np.ndarray, how: str) -> np.ndarray:
    """``[K]`` from one scale's ``[K, *cells]`` map: the mean or the max over its cells."""
    flat = probabilities.reshape(probabilities.shape[0], -1)
    pooled: np.ndarray = flat.max(axis=1) if how == "max" else flat.mean(axis=1)
    return pooled


def pool_scales(pooled: Sequence[np.ndarray], how: str) -> np.ndarray:
    """``[K]`` from every scale's :func:`pool_cells`: their mean, or their max."""
    result: np.ndarray = np.max(pooled, axis=0) if how == "max" else np.mean(pooled, axis=0)
    return result


def pool(maps: Sequence[np.ndarray], how: str) -> np.ndarray:
    """``[K]`` from per-scale ``[K, *cells]`` maps: mean per scale then across scales, or max."""
    return pool_scales([pool_cells(m, how) for m in maps], how)


def top_per_cell(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of every cell of a ``[K, *cells]`` map, and theirs.

    Returns ``[k, *cells]`` class indices (uint8 up to 256 classes, else uint16), most
    probable first with ties by index, and their probabilities as float16. Ranked
    :data:`TOP_BLOCK_CELLS` cells at a time, so the sort's temporaries stay small.
    """
    classes, spatial = probabilities.shape[0], probabilities.shape[1:]
    k = min(k, classes)
    flat = probabilities.reshape(classes, -1)
    index_type = np.uint8 if classes <= 256 else np.uint16
    indices = np.empty((k, flat.shape[1]), index_type)
    values = np.empty((k, flat.shape[1]), np.float16)
    for start in range(0, flat.shape[1], TOP_BLOCK_CELLS):
        block = flat[:, start : start + TOP_BLOCK_CELLS]
        if k == 1:
            order = block.argmax(axis=0)[None]
        else:
            order = np.argsort(-block, axis=0, kind="stable")[:k]
        indices[:, start : start + block.shape[1]] = order
        values[:, start : start + block.shape[1]] = np.take_along_axis(block, order, axis=0)
    return indices.reshape(k, *spatial), values.reshape(k, *spatial)


def best_cells(probabilities: np.ndarray, classes: Sequence[int]) -> list[tuple[int, ...]]:
    """For each class, the cell (index per axis) of its highest probability."""
    spatial = probabilities.shape[1:]
    return [
        tuple(int(v) for v in np.unravel_index(int(probabilities[c].argmax()), spatial))
        for c in classes
    ]


def box(begin: Sequence[int], window: Sequence[int]) -> tuple[int, ...]:
    """A window's box: ``[x0, y0, x1, y1]`` for an image, ``[start, end]`` along one axis.

    ``begin`` and ``window`` are per axis (rows first), as cells and windows are.
    """
    if len(begin) == 2:
        return (begin[1], begin[0], begin[1] + window[1], begin[0] + window[0])
    return (begin[0], begin[0] + window[0])
