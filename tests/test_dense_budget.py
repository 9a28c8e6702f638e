"""A dense request's answer size and memory, sized from its plan before any work; map formats.

Without a server: the size arithmetic of ``model_format.map_size``, the plan's refusals of an
answer too large or a pass too large for the memory budget, the passes a scale's copies go in,
the answer bound against a real serialized answer, and the arithmetic of the map formats.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from model_format import DenseGeometry, cell_counts
from model_format.map_size import class_index_bytes, map_bytes, twin_output_bytes
from service.classification import budget, dense
from service.classification.classify_dense import DenseResult, _formatted
from service.classification.plan import DenseLimits, DensePlan, DenseQuery, DenseTarget
from service.core.errors import InvalidArgument, ResourceExhausted

DIGITS = DenseGeometry((2, 2), (8, 8), (0, 0), (8, 8), True, 0.0, 1.0)
DEFAULTS = DenseLimits(copies=64, cells=1 << 20, pixels=0, elements=1 << 26)


def target(batch: int = 32, classes: int = 10) -> DenseTarget:
    """The demo model's twin as a plan sees it (its models are never run)."""
    model = SimpleNamespace(name="digits")
    return DenseTarget(model, None, DIGITS, 1, classes, 1, batch)  # type: ignore[arg-type]


def plan(query: DenseQuery, size: tuple[int, ...], limits: DenseLimits = DEFAULTS) -> DensePlan:
    return DensePlan.build(target(), query, size, None, limits)


def test_map_sizes_per_format() -> None:
    assert map_bytes((3, 4), 10) == 12 * 10 * 4
    assert map_bytes((3, 4), 10, "fp16") == 12 * 10 * 2
    assert map_bytes((3, 4), 10, "top_k", 2) == 12 * 2 * 3  # uint8 class, float16 probability
    assert map_bytes((3, 4), 1000, "top_k", 2) == 12 * 2 * 4  # uint16 class
    assert map_bytes((3, 4), 10, "top_k", 50) == 12 * 10 * 3  # k is at most the classes
    assert class_index_bytes(256) == 1 and class_index_bytes(257) == 2
    with pytest.raises(ValueError, match="map format must be one of fp32, fp16, top_k"):
        map_bytes((1,), 1, "png")


def test_a_twins_output_is_bounded_by_one_cell_per_stride() -> None:
    # 509 cells per axis are kept; a padded network could output 512.
    assert cell_counts((1024, 1024), (8, 8), (2, 2)) == (509, 509)
    assert twin_output_bytes(3, (1024, 1024), DIGITS, 10) == 3 * 10 * 4 * 512 * 512
    assert twin_output_bytes(1, (9, 8), DIGITS, 10, itemsize=2) == 10 * 2 * 5 * 4


def test_the_audits_fp32_map_is_refused_with_the_ways_out_and_fits_in_top_k_form() -> None:
    """1024x1024 at stride_divisor 2: 1,034,289 cells, 41 MB as fp32."""
    with pytest.raises(ResourceExhausted) as error:
        plan(DenseQuery(divisor=2), (1024, 1024))
    message = error.value.message
    assert message.startswith("the answer would take up to 41")
    assert "(a 1017x1017 map, fp32); the server answers at most 4194304" in message
    for way_out in ("stride_divisor", "return_map=false", "FP16", "TOP_K", "first scale"):
        assert way_out in message
    assert "--max-response-bytes" in message
    fits = plan(DenseQuery(divisor=2, map_format="top_k", top_k=1), (1024, 1024))
    assert fits.cells == 1017 * 1017 and 3 * fits.cells < fits.answer_bytes <= 4 << 20
    assert plan(DenseQuery(divisor=2, return_map=False), (1024, 1024)).answer_bytes < 2048
    with pytest.raises(ResourceExhausted, match="fp16"):
        plan(DenseQuery(divisor=2, map_format="fp16"), (1024, 1024))


def test_the_answer_bound_holds_for_a_real_answer_of_every_format(rng) -> None:
    from service.wire.classifier_servicer import dense_response

    size, classes = (61, 47), 10
    for query in (
        DenseQuery(divisor=2),
        DenseQuery(map_format="fp16", scales=(1.0, 0.5)),
        DenseQuery(divisor=2, map_format="top_k", top_k=3),
    ):
        built = plan(query, size)
        counts = built.passes[0].counts
        probabilities = dense.softmax(rng.standard_normal((classes, *counts)).astype(np.float32))
        values, top_classes = _formatted(probabilities, query)
        located = [
            dense_label(i, len(counts)) for i in range(query.k)
        ]  # labels as long as they come: every field set
        result = DenseResult(
            SimpleNamespace(name="digits_dense", version=1),  # type: ignore[arg-type]
            DIGITS,
            built.stride,
            located,
            values,
            [[10_000] * c for c in counts],  # the largest starts an image could have
            built.cells,
            query.scales,
            query.map_format,
            top_classes,
            classes,
        )
        assert dense_response(result, query).ByteSize() <= built.answer_bytes


def dense_label(index: int, axes: int):
    from service.classification.labels import Labelled

    return Labelled(str(index), index, 0.123, (4095,) * axes, (65535,) * (2 * axes))


def test_a_scales_copies_go_in_passes_that_fit_the_memory() -> None:
    small = plan(DenseQuery(divisor=2, scales=(1.0, 2.0)), (64, 64))
    assert small.rows == (4, 4)  # every copy in one pass
    large = plan(DenseQuery(divisor=2, return_map=False), (1000, 1000))
    assert large.rows == (1,)  # a million pixels: one copy a pass
    tight = DenseLimits(64, 1 << 20, 0, 1 << 26, memory_bytes=3 << 20, bytes_per_pixel=300)
    assert plan(DenseQuery(divisor=2), (64, 64), tight).rows == (1,)


def test_a_copy_that_does_not_fit_the_memory_is_refused_before_any_work() -> None:
    limits = DenseLimits(64, 1 << 30, 0, 1 << 30, memory_bytes=1 << 30)
    with pytest.raises(ResourceExhausted) as error:
        plan(DenseQuery(return_map=False), (2000, 2000), limits)
    assert error.value.message.startswith(
        "evaluating the image at scale 1 (2000x2000, dense mode, one shifted copy at a time) "
        "would take about "
    )
    assert error.value.message.endswith(
        "; the server gives one dense request at most 1073741824 (--dense-memory-bytes, 512 "
        "bytes a pixel of a dense pass): send a smaller image or scale, or use mode=crops"
    )
    # A model known to take less a pixel fits.
    cheaper = DenseLimits(64, 1 << 30, 0, 1 << 30, memory_bytes=1 << 30, bytes_per_pixel=128)
    assert plan(DenseQuery(return_map=False), (2000, 2000), cheaper).rows == (1,)


def test_crops_mode_needs_no_dense_pass_but_its_maps_count() -> None:
    crops = DenseQuery(mode="crops", return_map=False)
    assert plan(crops, (2000, 2000), DenseLimits(64, 1 << 30, 0, 1 << 40)).cells == 997 * 997
    with pytest.raises(ResourceExhausted, match=r"\(2000x2000, crops mode.*--dense-memory-bytes"):
        plan(crops, (2000, 2000), DenseLimits(64, 1 << 30, 0, 1 << 40, memory_bytes=50 << 20))


def test_an_explicit_pixel_cap_still_counts_every_scale_and_copy() -> None:
    with pytest.raises(ResourceExhausted, match="would take 40000 pixels"):
        plan(DenseQuery(divisor=2), (100, 100), DenseLimits(64, 1 << 20, 39999, 1 << 26))
    assert budget.bytes_per_pixel(DEFAULTS) == budget.ESTIMATED_BYTES_PER_PIXEL


def test_an_unknown_map_format_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="map_format must be one of fp32, fp16, top_k"):
        DenseQuery(map_format="jpeg").check()


def test_top_per_cell_is_a_stable_ranking_of_every_cell(rng, monkeypatch) -> None:
    monkeypatch.setattr(dense, "TOP_BLOCK_CELLS", 7)  # several blocks, one of them partial
    probabilities = rng.integers(0, 4, (6, 5, 4)).astype(np.float32) / 4  # many ties
    classes, values = dense.top_per_cell(probabilities, 3)
    assert classes.shape == values.shape == (3, 5, 4)
    assert classes.dtype == np.uint8 and values.dtype == np.float16
    order = np.argsort(-probabilities, axis=0, kind="stable")[:3]
    np.testing.assert_array_equal(classes, order)
    np.testing.assert_array_equal(values, np.take_along_axis(probabilities, order, 0))
    first, _ = dense.top_per_cell(probabilities, 1)
    np.testing.assert_array_equal(first[0], order[0])  # argmax breaks ties by index too
    wide, _ = dense.top_per_cell(rng.random((300, 2, 2)).astype(np.float32), 400)
    assert wide.dtype == np.uint16 and wide.shape == (300, 2, 2)


def test_copies_and_crops_of_part_of_a_scale_are_those_of_the_whole(rng) -> None:
    image = rng.standard_normal((2, 13, 11))
    every = dense.shifted_copies(image, (4, 4), 2)
    np.testing.assert_array_equal(dense.shifted_copies(image, (4, 4), 2, range(1, 3)), every[1:3])
    counts = cell_counts((13, 11), (4, 4), (4, 4), 2)
    crops = dense.crops(image, (4, 4), (4, 4), 2, counts)
    part = dense.crops(image, (4, 4), (4, 4), 2, counts, range(5, 11))
    np.testing.assert_array_equal(part, crops[5:11])


def test_interleaving_a_list_of_copies_equals_interleaving_their_stack(rng) -> None:
    maps = rng.standard_normal((4, 3, 5, 6))
    np.testing.assert_array_equal(
        dense.interleave(list(maps), 2, (9, 11)), dense.interleave(maps, 2, (9, 11))
    )


def test_softmax_in_place_equals_softmax_and_pools_combine_per_scale(rng) -> None:
    scores = rng.standard_normal((4, 3, 5)).astype(np.float32)
    expected = dense.softmax(scores)
    result = dense.softmax(scores, in_place=True)
    assert result is scores
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    maps = [rng.random((3, 4, 5)), rng.random((3, 2, 2))]
    for how in ("mean", "max"):
        pooled = dense.pool_scales([dense.pool_cells(m, how) for m in maps], how)
        np.testing.assert_allclose(pooled, dense.pool(maps, how))
