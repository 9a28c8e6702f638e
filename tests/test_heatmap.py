"""The heat-map: big enough to read, pixels not smeared, scaled to the map's range, a legend."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.tools.heatmap import MIN_LONG_SIDE, CellLayout, colour_scale, render_heatmap


def encoded(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


STRIP = np.full((8, 40), 100, np.uint8)  # the digit strip's size: 5 windows of 8x8
LAYOUT = CellLayout(rows=[0], columns=[2 * i for i in range(17)], window=(8, 8))


def test_a_small_image_is_enlarged_by_a_whole_factor_with_sharp_pixels() -> None:
    plane = np.linspace(0.001, 0.012, 17)[None]
    picture = np.asarray(render_heatmap(encoded(STRIP), plane, LAYOUT, "class 4"))
    factor = -(-MIN_LONG_SIDE // 40)  # 13
    assert picture.shape[1] == 40 * factor >= MIN_LONG_SIDE
    drawn = picture[: 8 * factor]
    blocks = drawn.reshape(8, factor, 40, factor, 3)
    # every source pixel became one uniform factor x factor block: nothing smeared
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_the_colour_scale_spans_the_maps_own_range() -> None:
    plane = np.full((1, 17), 0.002)
    plane[0, 8] = 0.012  # a class at ~1 %: its strongest cell still gets the top colour
    picture = np.asarray(render_heatmap(encoded(STRIP), plane, LAYOUT, "class 4"))
    factor = picture.shape[1] // 40
    row = picture[4 * factor, ::factor].astype(int)  # one pixel per source column
    brightness = row.sum(axis=1)
    # cell 8's window is x 16..23, centred at 19.5: pixels 19 and 20 are nearest to it
    assert brightness[19] == brightness[20] == brightness.max()
    assert (brightness[:19] < brightness[19]).all() and (brightness[21:] < brightness[19]).all()
    top = colour_scale(np.array([1.0]))[0].astype(int)
    assert np.abs(row[19] - (0.15 * 100 + 0.85 * top)).max() <= 2  # the top colour at 85 %


def test_the_legend_names_the_class_and_shows_the_scale() -> None:
    plane = np.linspace(0.0, 0.5, 17)[None]
    picture = np.asarray(render_heatmap(encoded(STRIP), plane, LAYOUT, "class 7 (index 7)"))
    factor = picture.shape[1] // 40
    legend = picture[8 * factor :]
    assert legend.shape[0] >= 40
    assert (legend < 100).any()  # text and the colour bar are drawn
    bar = legend[30, 10:-10].astype(int)
    assert bar[-1].sum() > bar[0].sum()  # dark to bright, left to right


def test_cells_the_map_does_not_know_leave_the_image_gray() -> None:
    plane = np.full((1, 17), np.nan)
    plane[0, 0] = 0.5
    layout = CellLayout(rows=[0], columns=[2 * i for i in range(17)], window=(8, 6))
    picture = np.asarray(render_heatmap(encoded(STRIP), plane, layout, "class 1"))
    factor = picture.shape[1] // 40
    unknown = picture[4 * factor, 30 * factor]  # x 30 is nearest to a cell the map does not know
    beyond = picture[4 * factor, 39 * factor]  # x 39 lies under no window (the last ends at 38)
    assert tuple(unknown) == tuple(beyond) == (100, 100, 100)
