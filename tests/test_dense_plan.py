"""DensePlan without a server: every scale's size and cells, and every limit, before any work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from model_format import DenseGeometry
from service.classification.plan import (
    DenseLimits,
    DensePlan,
    DenseQuery,
    DenseTarget,
    ScalePass,
)
from service.core.errors import InvalidArgument, ResourceExhausted
from service.core.settings import Settings

GEOMETRY = DenseGeometry((2, 2), (8, 8), (0, 0), (8, 8), True, 0.0, 1.0)
WIDE = DenseLimits(copies=64, cells=10**9, pixels=10**9, elements=10**9)


def target(channels: int = 1, geometry: DenseGeometry = GEOMETRY) -> DenseTarget:
    """A target whose models are never run: a plan only reads its geometry and channels."""
    model = SimpleNamespace(name="digits")
    return DenseTarget(model, None, geometry, channels)  # type: ignore[arg-type]


def plan(
    query: DenseQuery,
    size: tuple[int, ...] = (100, 100),
    limits: DenseLimits = WIDE,
    channels: int = 1,
) -> DensePlan:
    return DensePlan.build(target(channels), query, size, 12.5, limits)


def test_every_scale_has_its_size_and_cells() -> None:
    built = plan(DenseQuery(divisor=2, scales=(1.0, 0.5)), size=(100, 90), channels=3)
    assert built.passes == (
        ScalePass(1.0, (100, 90), (93, 83)),  # (100-8)*2//2+1, (90-8)*2//2+1
        ScalePass(0.5, (50, 45), (43, 38)),
    )
    assert built.cells == 93 * 83 + 43 * 38
    assert built.pixels == (100 * 90 + 50 * 45) * 4  # four shifted copies per scale
    assert built.elements == 3 * built.pixels
    assert built.stride == (1, 1) and built.copies == 4
    assert built.deadline == 12.5 and built.size == (100, 90)


def test_crops_mode_counts_the_crops_elements_and_no_dense_pixels() -> None:
    built = plan(DenseQuery(mode="crops"), channels=3)
    assert built.cells == 47 * 47 and built.pixels == 0
    assert built.elements == 47 * 47 * 3 * 8 * 8


def test_scaled_sizes_round_and_keep_a_pixel() -> None:
    wide = DenseGeometry((1,), (1,), (0,), None, True, 0.0, 1.0)
    built = DensePlan.build(target(1, wide), DenseQuery(scales=(0.25, 0.01)), (10,), None, WIDE)
    assert [p.size for p in built.passes] == [(2,), (1,)]
    assert [p.counts for p in built.passes] == [(2,), (1,)]


@pytest.mark.parametrize(
    ("query", "limits", "at_limit"),
    [
        (  # 2 scales x 4 copies
            DenseQuery(divisor=2, scales=(1.0, 0.5)),
            DenseLimits(copies=7, cells=10**9, pixels=10**9, elements=10**9),
            DenseLimits(copies=8, cells=10**9, pixels=10**9, elements=10**9),
        ),
        (  # 47 x 47 cells
            DenseQuery(),
            DenseLimits(copies=16, cells=2208, pixels=10**9, elements=10**9),
            DenseLimits(copies=16, cells=2209, pixels=10**9, elements=10**9),
        ),
        (  # four copies of 100 x 100
            DenseQuery(divisor=2),
            DenseLimits(copies=16, cells=10**9, pixels=39999, elements=10**9),
            DenseLimits(copies=16, cells=10**9, pixels=40000, elements=10**9),
        ),
        (  # 2209 crops of 8 x 8
            DenseQuery(mode="crops"),
            DenseLimits(copies=16, cells=10**9, pixels=0, elements=141375),
            DenseLimits(copies=16, cells=10**9, pixels=0, elements=141376),
        ),
    ],
)
def test_a_plan_at_a_limit_is_built_and_one_over_it_refused(query, limits, at_limit) -> None:
    assert plan(query, limits=at_limit).cells > 0
    with pytest.raises(ResourceExhausted):
        plan(query, limits=limits)


def test_each_limit_is_named_in_its_refusal() -> None:
    def refusal(query: DenseQuery, limits: DenseLimits) -> str:
        with pytest.raises(ResourceExhausted) as error:
            plan(query, limits=limits)
        return error.value.message

    assert refusal(
        DenseQuery(divisor=2, scales=(1.0, 0.5)), DenseLimits(7, 10**9, 10**9, 10**9)
    ) == ("8 shifted and scaled copies requested; the server evaluates at most 7")
    assert refusal(DenseQuery(), DenseLimits(16, 2208, 10**9, 10**9)) == (
        "the request asks for 2209 cells; the server computes at most 2208 per request"
    )
    assert refusal(DenseQuery(divisor=2), DenseLimits(16, 10**9, 30000, 10**9)) == (
        "the dense pass would take 40000 pixels (every scale and shifted copy); the server "
        "takes at most 30000: send a smaller image or fewer copies, or use mode=crops"
    )
    assert refusal(DenseQuery(divisor=2), DenseLimits(16, 10**9, 10**9, 20000)) == (
        "the request needs 40000 input elements (dense mode, every copy and scale); the server "
        "takes at most 20000 (max_tensor_elements)"
    )
    assert "needs 141376 input elements (crops mode" in refusal(
        DenseQuery(mode="crops"), DenseLimits(16, 10**9, 0, 20000)
    )


def test_the_dense_pixels_count_every_scale_and_the_channels_count_in_the_elements() -> None:
    query = DenseQuery(scales=(1.0, 2.0))  # 10,000 + 40,000 pixels
    assert plan(query, limits=DenseLimits(16, 10**9, 50000, 10**9)).pixels == 50000
    with pytest.raises(ResourceExhausted, match="take 50000 pixels"):
        plan(query, limits=DenseLimits(16, 10**9, 49999, 10**9))
    with pytest.raises(ResourceExhausted, match="needs 150000 input elements"):
        plan(query, limits=DenseLimits(16, 10**9, 10**9, 149999), channels=3)


def test_copies_are_refused_before_the_stride_and_the_sizes() -> None:
    # a divisor that does not divide the stride, on an image smaller than the window
    with pytest.raises(ResourceExhausted, match="27 shifted and scaled copies"):
        plan(
            DenseQuery(divisor=3, scales=(1.0, 0.5, 0.25)),
            size=(4, 4),
            limits=DenseLimits(16, 10**9, 10**9, 10**9),
        )


def test_a_divisor_that_does_not_divide_the_stride_is_refused() -> None:
    with pytest.raises(InvalidArgument) as error:
        plan(DenseQuery(divisor=3))
    assert error.value.message == "stride [2, 2] is not divisible by stride_divisor 3"


def test_an_image_smaller_than_the_window_at_any_scale_is_refused() -> None:
    with pytest.raises(InvalidArgument) as error:
        plan(DenseQuery(), size=(6, 20))
    assert error.value.message == "image 20x6 (at scale 1) is smaller than the model's window 8x8"
    with pytest.raises(InvalidArgument, match=r"image 8x6 \(at scale 0.3\) is smaller"):
        plan(DenseQuery(scales=(1.0, 0.3)), size=(20, 27))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (DenseQuery(divisor=0), "stride_divisor must be 1..8, got 0"),
        (DenseQuery(divisor=9), "stride_divisor must be 1..8, got 9"),
        (DenseQuery(scales=()), "scales must each be in (0, 4], got []"),
        (DenseQuery(scales=(1.0, 4.5)), "scales must each be in (0, 4], got [1.0, 4.5]"),
        (DenseQuery(scales=(0.0,)), "scales must each be in (0, 4], got [0.0]"),
        (DenseQuery(pool="median"), "pool must be mean or max, and mode dense or crops"),
        (DenseQuery(mode="tiles"), "pool must be mean or max, and mode dense or crops"),
    ],
)
def test_query_options_out_of_range_are_refused(query, message) -> None:
    with pytest.raises(InvalidArgument) as error:
        query.check()
    assert error.value.message == message


def test_query_options_in_range_pass() -> None:
    DenseQuery(divisor=8, scales=(0.1, 4.0), pool="max", mode="crops").check()


def test_limits_come_from_the_settings() -> None:
    settings = Settings()
    assert DenseLimits.from_settings(settings) == DenseLimits(
        copies=settings.max_dense_copies,
        cells=settings.max_map_cells,
        pixels=settings.max_dense_pixels,
        elements=settings.max_tensor_elements,
        response_bytes=settings.max_response_bytes,
        memory_bytes=settings.dense_memory_bytes,
        bytes_per_pixel=settings.dense_bytes_per_pixel,
    )


def _model(shape: list[int], dense: DenseGeometry | None, channels: int | None = None):
    info = SimpleNamespace(dense=dense, channels=channels, labels=None)
    return SimpleNamespace(
        name="m",
        info=info,
        inputs=[SimpleNamespace(shape=shape)],
        outputs=[SimpleNamespace(shape=[-1, 10])],
        max_batch_size=32,
    )


def test_target_takes_the_classifier_geometry_or_else_the_twins() -> None:
    twin_geometry = DenseGeometry((4, 4), (8, 8), (0, 0), None, False, 0.1, 0.9)
    own = DenseTarget.of(_model([-1, 1, 8, 8], GEOMETRY), _model([-1, 1, -1, -1], twin_geometry))
    assert own.geometry == GEOMETRY and own.channels == 1
    borrowed = DenseTarget.of(_model([-1, 3, 8, 8], None), _model([-1, 3, -1, -1], twin_geometry))
    assert borrowed.geometry == twin_geometry and borrowed.channels == 3


def test_target_channels_of_a_dynamic_input_come_from_the_metadata_or_are_three() -> None:
    assert DenseTarget.of(_model([-1, -1, 8, 8], GEOMETRY, 4), None).channels == 4
    assert DenseTarget.of(_model([-1, -1, 8, 8], GEOMETRY), None).channels == 3
    assert DenseTarget.of(_model([-1], GEOMETRY), None).channels == 1


def test_target_without_a_geometry_is_refused() -> None:
    with pytest.raises(InvalidArgument) as error:
        DenseTarget.of(_model([-1, 1, 8, 8], None), None)
    assert error.value.message == "model 'm' has no dense geometry in its metadata"
