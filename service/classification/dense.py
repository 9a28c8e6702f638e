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
    "shifted_copies",
    "softmax",
    "twin_map",
]


def _shifts(stride: Sequence[int], divisor: int) -> list[tuple[int, ...]]:
    return list(itertools.product(*([k * st // divisor for k in range(divisor)] for st in stride)))


def shifted_copies(image: np.ndarray, stride: Sequence[int], divisor: int) -> np.ndarray:
    """``[d**n, C, *size]``: the image shifted by every multiple of ``stride / d``, row-major."""
    copies = np.zeros((divisor ** len(stride), *image.shape), dtype=image.dtype)
    for index, shift in enumerate(_shifts(stride, divisor)):
        source: tuple[Any, ...] = (slice(None), *(slice(s, None) for s in shift))
        target: tuple[Any, ...] = (
            index,
            slice(None),
            *(slice(0, n - s) for n, s in zip(image.shape[1:], shift, strict=True)),
        )
        copies[target] = image[source]
    return copies


def interleave(maps: np.ndarray, divisor: int, counts: Sequence[int]) -> np.ndarray:
    """``[K, *counts]`` from the ``[d**n, K, *cells]`` maps of :func:`shifted_copies`."""
    ndim = len(counts)
    per_copy = [-(-c // divisor) for c in counts]  # ceil: cells each copy must provide
    maps = maps[(slice(None), slice(None), *(slice(0, p) for p in per_copy))]
    grid = maps.reshape(*([divisor] * ndim), maps.shape[1], *per_copy)
    # axes: (k_0..k_n-1, K, i_0..i_n-1) -> (K, i_0, k_0, i_1, k_1, ...)
    order = [ndim] + [a for axis in range(ndim) for a in (ndim + 1 + axis, axis)]
    merged = grid.transpose(order).reshape(maps.shape[1], *(p * divisor for p in per_copy))
    return np.ascontiguousarray(merged[(slice(None), *(slice(0, c) for c in counts))])


def crops(
    image: np.ndarray,
    window: Sequence[int],
    stride: Sequence[int],
    divisor: int,
    counts: Sequence[int],
) -> np.ndarray:
    """``[cells, C, *window]``: every cell's window, in row-major cell order."""
    step = [st // divisor for st in stride]
    windows = [
        image[
            (
                slice(None),
                *(slice(i * s, i * s + w) for i, s, w in zip(position, step, window, strict=True)),
            )
        ]
        for position in itertools.product(*(range(c) for c in counts))
    ]
    return np.stack(windows)


def twin_map(scores: np.ndarray, divisor: int, counts: Sequence[int]) -> np.ndarray:
    """``[K, *counts]`` scores from the dense twin's ``[d**n, K, *cells]`` output.

    One copy (``d == 1``) is cut to ``counts``; several are interleaved (:func:`interleave`).
    """
    if divisor > 1:
        return interleave(scores, divisor, counts)
    cut: np.ndarray = scores[0][(slice(None), *(slice(0, c) for c in counts))]
    return cut


def crops_map(scores: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """``[K, *counts]`` scores from the classifier's ``[cells, K]`` rows of :func:`crops`."""
    return np.ascontiguousarray(scores.T).reshape(scores.shape[1], *counts)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (the classes), computed stably in float32."""
    shifted = scores - scores.max(axis=0, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    result: np.ndarray = exp / exp.sum(axis=0, keepdims=True)
    return result


def pool(maps: Sequence[np.ndarray], how: str) -> np.ndarray:
    """``[K]`` from per-scale ``[K, *cells]`` maps: mean per scale then across scales, or max."""
    flat = [m.reshape(m.shape[0], -1) for m in maps]
    pooled: np.ndarray
    if how == "max":
        pooled = np.max(np.concatenate(flat, axis=1), axis=1)
    else:
        pooled = np.mean([f.mean(axis=1) for f in flat], axis=0)
    return pooled


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
