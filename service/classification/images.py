"""Encoded images to the network's input tensor, with every limit checked before decoding.

Reading the header (:func:`open_image`) and decoding the pixels (:func:`load`) are separate
steps, so a caller reads the size once and then chooses where to decode: large images off the
event loop (Pillow releases the GIL while decoding), tiny ones on it, where the hop to a thread
would cost more than the decoding. The encoded size is checked before Pillow sees the bytes,
and the pixel count from the header before any pixel is decoded, so a decompression bomb costs
nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_format import Preprocess
from service.core.errors import InvalidArgument, ResourceExhausted

__all__ = ["ImageLimits", "decode", "load", "open_image", "to_tensor"]

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
Image.MAX_IMAGE_PIXELS = None  # our own, clearer check below replaces Pillow's warning


@dataclass(frozen=True)
class ImageLimits:
    """Largest encoded image (bytes) and decoded image (pixels) accepted."""

    max_bytes: int
    max_pixels: int


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read an encoded image's header, checking the limits; no pixel is decoded yet.

    Cheap (Pillow opens lazily), so a caller can judge the work by the size before choosing
    where :func:`load` decodes it.

    Raises:
        ResourceExhausted: the encoded bytes or the declared pixel count exceed the limits.
        InvalidArgument: empty, unreadable or unsupported image data, or a broken header.
    """
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(
            f"image is {len(data)} bytes; the server accepts at most {limits.max_bytes}"
        )
    if not data:
        raise InvalidArgument("image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(f"image is not a readable {', '.join(FORMATS)} file") from None
    except (OSError, SyntaxError, ValueError) as exc:  # a known signature, a broken header
        raise InvalidArgument(f"image header is corrupt or truncated ({exc})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ResourceExhausted(
            f"image is {width}x{height} = {width * height} pixels; the server accepts at most "
            f"{limits.max_pixels}"
        )
    return image


def load(image: Image.Image, color: str) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image` into ``color`` ("RGB" or "L").

    Raises:
        InvalidArgument: the pixel data is corrupt or truncated.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Pillow warns, not fails, on some truncated files
            image.load()
    except (OSError, SyntaxError, ValueError, Warning) as exc:
        raise InvalidArgument(f"{image.format} image is corrupt or truncated ({exc})") from None
    return image if image.mode == color else image.convert(color)


def decode(data: bytes, limits: ImageLimits, color: str) -> Image.Image:
    """Decode JPEG, PNG, WebP or BMP bytes into a ``color`` image.

    :func:`open_image`, then :func:`load`, with their errors.
    """
    return load(open_image(data, limits), color)


def to_tensor(
    image: Image.Image, preprocess: Preprocess, size: tuple[int, int] | None = None
) -> np.ndarray:
    """``[C, H, W]`` float32: optionally resized to ``size`` (H, W), then scaled, normalised."""
    if size is not None and (image.height, image.width) != size:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(preprocess.mean, np.float32)
    std = np.asarray(preprocess.std, np.float32)
    normalised = (pixels * np.float32(preprocess.scale) - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def resize(image: Image.Image, scale: float) -> Image.Image:
    """The image scaled by ``scale`` (at least one pixel per side)."""
    if scale == 1.0:
        return image
    width = max(1, round(image.width * scale))
    height = max(1, round(image.height * scale))
    return image.resize((width, height), Image.Resampling.BILINEAR)
