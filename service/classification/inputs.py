"""Image inputs: encoded images or preprocessed tensors, checked, decoded and preprocessed.

Every header is read on the event loop first (cheap: Pillow opens lazily), so a refused image
costs no hop to a thread; many headers are read a batch at a time, letting other requests run
in between. The images are then decoded and preprocessed a chunk at a time (see
:meth:`ImageInputs.window_tensors`): tiny ones on the loop while a chunk's tiny pixels are few,
since the hop to a decoding thread and back would cost more CPU than the decoding; larger ones,
a chunk's many tiny ones together, and every ClassifyDense image on the decoding threads
(Pillow releases the GIL while decoding).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from service.classification import images
from service.core.errors import InvalidArgument, ResourceExhausted
from service.core.settings import Settings
from service.engine.repository import ServedModel

__all__ = ["INLINE_PIXELS", "ImageInput", "ImageInputs", "check_tensor"]

T = TypeVar("T")

INLINE_PIXELS = 64 * 64
"""Images up to this many pixels are decoded and preprocessed on the event loop."""


@dataclass(frozen=True)
class ImageInput:
    """One image: encoded bytes, or an already preprocessed float32 tensor."""

    encoded: bytes | None = None
    tensor: np.ndarray | None = None


def check_tensor(
    model: ServedModel, tensor: np.ndarray, window: tuple[int, ...] | None
) -> np.ndarray:
    """A preprocessed ``tensor``, refused unless it has the model's rank and fits ``window``.

    ``window`` holds the model's input size per spatial axis (-1 where any size fits); None
    takes any size.
    """
    expected = model.inputs[0].shape[1:]
    if tensor.ndim != len(expected):
        raise InvalidArgument(
            f"tensor shape {list(tensor.shape)} has rank {tensor.ndim}; "
            f"model '{model.name}' takes {list(expected)} per image"
        )
    if window is not None and any(
        w not in (-1, d) for w, d in zip(window, tensor.shape[1:], strict=True)
    ):
        raise InvalidArgument(
            f"tensor shape {list(tensor.shape)} does not match the model's input {list(expected)}"
        )
    return tensor


class ImageInputs:
    """Image inputs to network inputs, with the image and request limits of ``settings``.

    Args:
        settings: the server's limits (image bytes and pixels, request pixels, tensor elements).
        executor: the decoding threads.
    """

    def __init__(self, settings: Settings, executor: Executor) -> None:
        self._executor = executor
        self._limits = images.ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self._max_request_pixels = settings.max_request_pixels
        self._max_elements = settings.max_tensor_elements

    async def off_loop(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on a decoding thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def off_loop_if(self, off: bool, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on a decoding thread if ``off``, else here on the loop."""
        return await self.off_loop(function, *args) if off else function(*args)

    def open(self, model: ServedModel, image: ImageInput) -> Image.Image:
        """An encoded image's header, read and checked against the limits (nothing decoded)."""
        if model.info.preprocess is None:
            raise InvalidArgument(
                f"model '{model.name}' has no preprocessing metadata; send "
                "a preprocessed tensor instead of encoded bytes"
            )
        if image.encoded is None:
            raise InvalidArgument("image has neither encoded bytes nor a tensor")
        return images.open_image(image.encoded, self._limits)

    def decode(self, model: ServedModel, image: ImageInput) -> Image.Image:
        """An encoded image, checked and decoded into the model's colour mode."""
        return self.load(model, self.open(model, image))

    def load(self, model: ServedModel, opened: Image.Image) -> Image.Image:
        """The pixels of an image :meth:`open` read the header of, in the model's colour mode."""
        assert model.info.preprocess is not None  # checked by open
        return images.load(opened, model.info.preprocess.color)

    async def tensors(self, model: ServedModel, inputs: Sequence[ImageInput]) -> list[np.ndarray]:
        """Every image as the network's input (:meth:`open_all`, then :meth:`window_tensors`)."""
        return await self.window_tensors(model, inputs, await self.open_all(model, inputs))

    async def open_all(
        self, model: ServedModel, inputs: Sequence[ImageInput], step: int = 0
    ) -> list[Image.Image | None]:
        """Every encoded image's header (None for a tensor), read and checked, nothing decoded.

        Read ``step`` at a time (0: all at once), other requests running in between; then the
        images together are checked against the request's limits.
        """
        step = step or len(inputs)
        opened: list[Image.Image | None] = []
        for start in range(0, len(inputs), step):
            if start:
                await asyncio.sleep(0)
            opened += [
                None if image.tensor is not None else self.open(model, image)
                for image in inputs[start : start + step]
            ]
        self._check_request_size(model, inputs, opened)
        return opened

    async def window_tensors(
        self,
        model: ServedModel,
        inputs: Sequence[ImageInput],
        opened: Sequence[Image.Image | None],
    ) -> list[np.ndarray]:
        """The network's input for each of ``inputs`` (one chunk), whose headers are ``opened``.

        Tiny images are decoded here on the loop while their pixels together stay within
        :data:`INLINE_PIXELS`, else together on one decoding thread; each larger image on a
        decoding thread of its own, so that several decode at once.
        """
        tiny = [o is None or o.width * o.height <= INLINE_PIXELS for o in opened]
        tiny_pixels = sum(o.width * o.height for o, t in zip(opened, tiny, strict=True) if o and t)
        groups = [[index] for index in range(len(inputs)) if not tiny[index]]
        tensors: dict[int, np.ndarray] = {}
        small = [index for index in range(len(inputs)) if tiny[index]]
        if tiny_pixels <= INLINE_PIXELS:
            tensors.update((i, _window_tensor(model, inputs[i], opened[i])) for i in small)
        elif small:
            groups.insert(0, small)
        if groups:
            # Started only here, so a tiny image's error above leaves no coroutine never awaited.
            done = await asyncio.gather(
                *(
                    self.off_loop(
                        _window_tensors,
                        model,
                        [inputs[i] for i in group],
                        [opened[i] for i in group],
                    )
                    for group in groups
                )
            )
            for group, results in zip(groups, done, strict=True):
                tensors.update(zip(group, results, strict=True))
        return [tensors[index] for index in range(len(inputs))]

    def _check_request_size(
        self,
        model: ServedModel,
        inputs: Sequence[ImageInput],
        opened: Sequence[Image.Image | None],
    ) -> None:
        """Refuse a request whose images together are too much work, before decoding any.

        Each image passed its own limits; together they could still ask for the decoding of
        far more pixels, or (every image becoming a window-sized tensor, however small it
        was) far more input elements than one request may hold.
        """
        pixels = sum(o.width * o.height for o in opened if o is not None)
        if pixels > self._max_request_pixels:
            raise ResourceExhausted(
                f"the {len(inputs)} images hold {pixels} pixels together; the server decodes at "
                f"most {self._max_request_pixels} per request: send fewer images at a time"
            )
        per_image = math.prod(d for d in model.inputs[0].shape[1:] if d > 0)
        elements = sum(
            image.tensor.size if image.tensor is not None else per_image for image in inputs
        )
        if elements > self._max_elements:
            raise ResourceExhausted(
                f"the {len(inputs)} images make {elements} input elements; the server accepts "
                f"at most {self._max_elements} per request: send fewer images at a time"
            )


def _window_tensors(
    model: ServedModel, inputs: Sequence[ImageInput], opened: Sequence[Image.Image | None]
) -> list[np.ndarray]:
    """:func:`_window_tensor` of each image, in order (one decoding thread's job)."""
    return [
        _window_tensor(model, image, header) for image, header in zip(inputs, opened, strict=True)
    ]


def _window_tensor(model: ServedModel, image: ImageInput, opened: Image.Image | None) -> np.ndarray:
    """The classifier's input for one image: a checked tensor, or ``opened`` decoded and sized."""
    if opened is None:
        assert image.tensor is not None
        window = tuple(d for d in model.inputs[0].shape[2:])
        return check_tensor(model, image.tensor, window)
    info = model.info
    assert info.preprocess is not None  # checked when it was opened
    if info.window is None or len(info.window) != 2:
        raise InvalidArgument(f"model '{model.name}' does not describe a 2-D input window")
    try:
        decoded = images.load(opened, info.preprocess.color)
        try:
            return images.to_tensor(decoded, info.preprocess, (info.window[0], info.window[1]))
        finally:
            decoded.close()
    finally:
        opened.close()  # its pixels go at once, not when the whole request is done
