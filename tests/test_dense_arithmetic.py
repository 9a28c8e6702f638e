"""The dense arithmetic, without a server: each result checked against a direct computation.

The stand-in network is linear: a cell's scores are ``weights @ window.ravel()``. Its map over
an image at a given step, computed crop by crop, is the reference every fast path must equal.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model_format import cell_counts, cell_starts
from service.classification import dense

CLASSES = 3


def direct_map(
    image: np.ndarray,
    weights: np.ndarray,
    window: tuple[int, ...],
    step: tuple[int, ...],
    counts: tuple[int, ...],
) -> np.ndarray:
    """``[K, *counts]``: the linear network on every crop, one crop at a time."""
    out = np.zeros((weights.shape[0], *counts), np.float64)
    for cell in itertools.product(*(range(c) for c in counts)):
        region = tuple(slice(i * s, i * s + w) for i, s, w in zip(cell, step, window, strict=True))
        out[(slice(None), *cell)] = weights @ image[(slice(None), *region)].ravel()
    return out


def twin(
    image: np.ndarray, weights: np.ndarray, window: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """What a padding-free dense twin answers for one image: every cell it can fill."""
    counts = cell_counts(image.shape[1:], window, stride)
    return direct_map(image, weights, window, stride, counts)


CASES = [  # (size, window, stride, divisor)
    ((13, 17), (8, 8), (2, 2), 2),
    ((21, 19), (6, 5), (4, 4), 2),
    ((21, 19), (6, 5), (4, 4), 4),
    ((20,), (5,), (6,), 3),
    ((16, 16), (8, 8), (2, 2), 1),
]


@pytest.mark.parametrize(("size", "window", "stride", "divisor"), CASES)
def test_interleaved_shifted_copies_equal_the_map_at_the_finer_stride(
    rng, size, window, stride, divisor
) -> None:
    image = rng.standard_normal((2, *size))
    weights = rng.standard_normal((CLASSES, 2 * int(np.prod(window))))
    copies = dense.shifted_copies(image, stride, divisor)
    maps = np.stack([twin(copy, weights, window, stride) for copy in copies])
    counts = cell_counts(size, window, stride, divisor)
    expected = direct_map(image, weights, window, tuple(s // divisor for s in stride), counts)
    merged = dense.twin_map(maps, divisor, counts)
    assert merged.shape == (CLASSES, *counts)
    np.testing.assert_allclose(merged, expected, rtol=1e-12, atol=1e-12)
    if divisor > 1:
        np.testing.assert_allclose(dense.interleave(maps, divisor, counts), expected, atol=1e-12)


def test_shifted_copies_are_the_image_shifted_and_zero_padded(rng) -> None:
    image = rng.standard_normal((2, 7, 9))
    copies = dense.shifted_copies(image, (4, 6), 2)
    shifts = [(0, 0), (0, 3), (2, 0), (2, 3)]  # row-major, multiples of stride / 2
    assert copies.shape == (4, 2, 7, 9) and copies.dtype == image.dtype
    for copy, (dy, dx) in zip(copies, shifts, strict=True):
        expected = np.zeros_like(image)
        expected[:, : 7 - dy, : 9 - dx] = image[:, dy:, dx:]
        np.testing.assert_array_equal(copy, expected)


def test_crops_are_every_window_in_row_major_order(rng) -> None:
    image = rng.standard_normal((1, 11, 12))
    counts = cell_counts((11, 12), (4, 5), (2, 4), 2)  # step 1 x 2
    assert counts == (8, 4)
    windows = dense.crops(image, (4, 5), (2, 4), 2, counts)
    assert windows.shape == (32, 1, 4, 5)
    for n, (y, x) in enumerate(itertools.product(range(8), range(4))):
        np.testing.assert_array_equal(windows[n], image[:, y : y + 4, 2 * x : 2 * x + 5])


def test_crops_map_lays_rows_out_as_the_direct_map(rng) -> None:
    image = rng.standard_normal((1, 11, 12))
    weights = rng.standard_normal((CLASSES, 20))
    counts = cell_counts((11, 12), (4, 5), (2, 4), 2)
    windows = dense.crops(image, (4, 5), (2, 4), 2, counts)
    rows = windows.reshape(len(windows), -1) @ weights.T  # [cells, K], as the classifier answers
    expected = direct_map(image, weights, (4, 5), (1, 2), counts)
    np.testing.assert_allclose(dense.crops_map(rows, counts), expected, atol=1e-12)


def test_twin_map_of_one_copy_is_cut_to_the_cell_counts(rng) -> None:
    scores = rng.standard_normal((1, CLASSES, 5, 6))
    np.testing.assert_array_equal(dense.twin_map(scores, 1, (4, 6)), scores[0, :, :4, :])


def test_cell_starts_are_the_crops_origins() -> None:
    counts = cell_counts((11, 12), (4, 5), (2, 4), 2)
    assert cell_starts(counts, (2, 4), 2, (0, 0)) == [list(range(8)), [0, 2, 4, 6]]
    # with an offset, and in the pixels of an image twice as large as the one evaluated
    assert cell_starts((3, 2), (2, 4), 1, (1, 3), 0.5) == [[2, 6, 10], [6, 14]]


def test_softmax_is_exp_over_its_sum_along_the_classes(rng) -> None:
    scores = rng.standard_normal((4, 3, 5)).astype(np.float32)
    expected = np.exp(scores) / np.exp(scores).sum(axis=0, keepdims=True)
    result = dense.softmax(scores)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    np.testing.assert_allclose(result.sum(axis=0), 1.0, rtol=1e-6)


def test_softmax_is_stable_for_large_scores() -> None:
    result = dense.softmax(np.array([[1000.0], [999.0]], np.float32))
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result[:, 0], [1 / (1 + np.exp(-1)), 1 / (1 + np.e)], rtol=1e-6)


def test_mean_pool_averages_each_scale_then_the_scales() -> None:
    fine = np.array([[[1.0, 1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]])  # [2, 1, 4]
    coarse = np.array([[[0.0]], [[1.0]]])  # [2, 1, 1]
    # per scale first: (1 + 0) / 2; over all five cells it would be 4/5
    np.testing.assert_allclose(dense.pool([fine, coarse], "mean"), [0.5, 0.5])
    np.testing.assert_allclose(dense.pool([fine], "mean"), [1.0, 0.0])


def test_max_pool_takes_the_highest_cell_of_every_scale(rng) -> None:
    maps = [rng.random((3, 4, 5)), rng.random((3, 2, 2)), rng.random((3, 1, 1))]
    expected = [max(float(m[k].max()) for m in maps) for k in range(3)]
    np.testing.assert_allclose(dense.pool(maps, "max"), expected)


def test_best_cells_are_where_each_class_peaks(rng) -> None:
    probabilities = rng.random((4, 3, 5))
    cells = dense.best_cells(probabilities, [2, 0, 3])
    for cls, cell in zip([2, 0, 3], cells, strict=True):
        flat = [(probabilities[cls][y, x], (y, x)) for y in range(3) for x in range(5)]
        assert cell == max(flat)[1]
        assert all(isinstance(v, int) for v in cell)


def test_boxes_are_x0_y0_x1_y1_for_images_and_start_end_along_one_axis() -> None:
    assert dense.box([4, 10], [8, 6]) == (10, 4, 16, 12)
    assert dense.box([3], [5]) == (3, 8)
