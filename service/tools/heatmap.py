"""A dense map drawn over its image, readable at a glance: upscaled, coloured, with a legend.

The map's probabilities for one class are painted over the image, each pixel in the colour of
the cell whose window is centred nearest to it, on a colour scale normalised to the map's own
range, so that a class at 1% still shows where it is strongest. Small images are enlarged by a
whole factor with nearest-neighbour sampling, so pixels stay sharp and cells stay where the map
says. The legend names the class and shows the probability each colour stands for.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MIN_LONG_SIDE", "CellLayout", "colour_scale", "render_heatmap"]

MIN_LONG_SIDE = 512
"""Images are enlarged by a whole factor until their long side is at least this many pixels."""

_LEGEND_HEIGHT = 64
# Black, purple, red, orange, pale yellow: dark for low, bright for high, readable over gray.
_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32
)


@dataclass(frozen=True)
class CellLayout:
    """Where the map's cells look in the image, in the image's own pixels.

    Attributes:
        rows: the pixel row where each row of cells' windows starts.
        columns: the pixel column where each column of cells' windows starts.
        window: the window's (height, width) in the image's pixels.
    """

    rows: Sequence[int]
    columns: Sequence[int]
    window: tuple[int, int]


def colour_scale(values: np.ndarray) -> np.ndarray:
    """RGB ``uint8`` colours for values in [0, 1], on the legend's scale."""
    position = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.minimum(position.astype(np.int64), len(_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    colours: np.ndarray = _ANCHORS[low] * (1 - fraction) + _ANCHORS[low + 1] * fraction
    return colours.round().astype(np.uint8)


def _nearest_cell(starts: Sequence[int], window: int, length: int) -> np.ndarray:
    """Per pixel along one axis, the cell whose window's centre is nearest (-1: no window)."""
    centres = np.asarray(starts, np.float64) + (window - 1) / 2
    pixels = np.arange(length)
    cell = np.searchsorted((centres[1:] + centres[:-1]) / 2, pixels)
    inside = (pixels >= starts[0]) & (pixels < starts[-1] + window)
    return np.where(inside, cell, -1)


def _heat(plane: np.ndarray, layout: CellLayout, size: tuple[int, int]) -> np.ndarray:
    """Each pixel the value of the cell centred nearest to it (NaN: under no window).

    Neighbouring windows overlap (the stride is smaller than the window); giving each pixel to
    its nearest cell keeps every cell a sharp block where the map puts it, instead of a blur.
    """
    rows = _nearest_cell(layout.rows, layout.window[0], size[0])
    columns = _nearest_cell(layout.columns, layout.window[1], size[1])
    picked = plane[np.clip(rows, 0, None)[:, None], np.clip(columns, 0, None)[None, :]]
    heat: np.ndarray = picked.astype(np.float64)
    heat[(rows < 0)[:, None] | (columns < 0)[None, :]] = np.nan
    return heat


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _legend(width: int, title: str, low: float, high: float) -> Image.Image:
    legend = Image.new("RGB", (width, _LEGEND_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    draw.text((8, 4), title, fill=(0, 0, 0), font=_font(14))
    bar_left, bar_right, bar_top = 8, width - 8, 26
    ramp = colour_scale(np.linspace(0.0, 1.0, bar_right - bar_left))
    bar = Image.fromarray(np.repeat(ramp[None], 14, axis=0))
    legend.paste(bar, (bar_left, bar_top))
    small = _font(12)
    draw.text((bar_left, bar_top + 17), f"{low:.2%}", fill=(0, 0, 0), font=small)
    right = f"{high:.2%}"
    draw.text(
        (bar_right - draw.textlength(right, font=small), bar_top + 17), right, (0, 0, 0), small
    )
    return legend


def render_heatmap(
    image_bytes: bytes, plane: np.ndarray, layout: CellLayout, title: str
) -> Image.Image:
    """The image with ``plane`` (one class's probability per cell) painted over it and a legend.

    Args:
        image_bytes: the encoded image the map was computed on.
        plane: ``[rows, columns]`` probabilities of the class shown (NaN where unknown).
        layout: where each cell's window lies in the image.
        title: the legend's first line (the class's name and what was pooled).
    """
    base = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    finite = plane[np.isfinite(plane)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    heat = _heat(plane, layout, (base.height, base.width))
    normalised = (heat - low) / (high - low) if high > low else np.where(np.isnan(heat), heat, 1.0)
    painted = colour_scale(np.nan_to_num(normalised))
    gray = np.asarray(base.convert("L").convert("RGB"), np.float32)
    # The colour covers more of the image where the class is stronger: the image stays visible
    # where the map says little.
    alpha = np.where(np.isnan(heat), 0.0, 0.35 + 0.5 * np.nan_to_num(normalised))[..., None]
    mixed = ((1 - alpha) * gray + alpha * painted).round().astype(np.uint8)
    factor = max(1, math.ceil(MIN_LONG_SIDE / max(base.size)))
    shown = Image.fromarray(mixed).resize(
        (base.width * factor, base.height * factor), Image.Resampling.NEAREST
    )
    canvas = Image.new("RGB", (shown.width, shown.height + _LEGEND_HEIGHT), (255, 255, 255))
    canvas.paste(shown, (0, 0))
    canvas.paste(_legend(shown.width, title, low, high), (0, shown.height))
    return canvas
