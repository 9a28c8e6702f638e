"""The inputs a reduced precision is calibrated on and measured against fp32 with.

A folder of images is preprocessed exactly as the server preprocesses a client's image (resized
to the window, then ``(pixel * scale - mean) / std``); one image in five is held out to measure
what the precision cost. Random inputs stand in where no data is given: fit for timing the
model, not for judging its accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_format import Preprocess

from .errors import ExportError

__all__ = [
    "HELD_OUT_EVERY",
    "RANDOM_HELD_OUT",
    "Samples",
    "folder_samples",
    "normalise",
    "random_samples",
]

IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
HELD_OUT_EVERY = 5
"""One image in this many of a calibration folder is held out, never calibrated on."""
RANDOM_HELD_OUT = 64
"""Random inputs the cost is measured on when no data is given."""


@dataclass(frozen=True)
class Samples:
    """Calibration and held-out inputs, preprocessed: ``[N, C, *window]`` float32 each.

    Attributes:
        calibration: what int8 activation ranges are calibrated on.
        held_out: what the reduced precision is compared with fp32 on (never calibrated on).
        calibration_source: where the calibration inputs came from, for people.
        held_out_source: where the held-out inputs came from, for people.
        random: the inputs are random: the measured agreement is printed, not enforced.
    """

    calibration: np.ndarray
    held_out: np.ndarray
    calibration_source: str
    held_out_source: str
    random: bool = False


def normalise(pixels: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """``(pixel * scale - mean) / std`` per channel of ``[N, C, *spatial]`` 8-bit pixel values."""
    spatial = (1,) * (pixels.ndim - 2)
    mean = np.asarray(preprocess.mean, np.float32).reshape(1, -1, *spatial)
    std = np.asarray(preprocess.std, np.float32).reshape(1, -1, *spatial)
    scaled = pixels.astype(np.float32) * np.float32(preprocess.scale)
    return np.ascontiguousarray((scaled - mean) / std, dtype=np.float32)


def _image(path: Path, preprocess: Preprocess, window: Sequence[int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert(preprocess.color)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ExportError(f"cannot read calibration image '{path}': {exc}") from exc
    if (image.height, image.width) != tuple(window):
        image = image.resize((window[1], window[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels.transpose(2, 0, 1)


def folder_samples(
    folder: Path, preprocess: Preprocess, input_shape: Sequence[int], limit: int
) -> Samples:
    """The images under ``folder``, preprocessed for the model, split into the two parts.

    One in :data:`HELD_OUT_EVERY` is held out; at most ``limit`` of the rest are calibrated on.

    Raises:
        ExportError: the folder is missing or holds fewer than two images, an image cannot be
            read, or the model's input is not an image.
    """
    if len(input_shape) != 3:
        raise ExportError(
            "--calibration DIR holds images; a CxL model takes --calibration random instead"
        )
    if not folder.is_dir():
        raise ExportError(f"calibration folder '{folder}' does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ExportError(
            f"calibration folder '{folder}' holds {len(files)} image(s); at least 2 are needed "
            f"(one in {HELD_OUT_EVERY} is held out to measure the precision's cost)"
        )
    # A fixed shuffle: the held-out part is spread over the folder, the same on every run.
    order = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    held = max(1, len(files) // HELD_OUT_EVERY)
    window = tuple(input_shape[1:])

    def load(paths: Sequence[Path]) -> np.ndarray:
        return normalise(np.stack([_image(p, preprocess, window) for p in paths]), preprocess)

    calibrated = order[held:][:limit]
    return Samples(
        calibration=load(calibrated),
        held_out=load(order[:held]),
        calibration_source=f"{len(calibrated)} images of {folder}",
        held_out_source=f"{held} held-out images of {folder}",
    )


def random_samples(preprocess: Preprocess, input_shape: Sequence[int], count: int) -> Samples:
    """Uniformly random 8-bit pixels, preprocessed: ``count`` to calibrate on, more to measure on.

    The measuring part holds :data:`RANDOM_HELD_OUT` inputs.
    """
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (count + RANDOM_HELD_OUT, *input_shape)).astype(np.float32)
    inputs = normalise(pixels, preprocess)
    return Samples(
        calibration=inputs[:count],
        held_out=inputs[count:],
        calibration_source=f"{count} random inputs",
        held_out_source=f"{RANDOM_HELD_OUT} random inputs",
        random=True,
    )
