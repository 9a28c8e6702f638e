"""Classify: the top-k labels of every image of a request, from the logical model.

A request carries at most :meth:`Classify.image_limit` images, so that none holds the server for
long: by default the model's ``max_batch_size`` times :data:`IMAGES_PER_BATCH`, one full round
of the chunks a request keeps in flight (:data:`~service.classification.chunks.CHUNKS_IN_FLIGHT`).
A larger request would gain nothing by being one (its chunks queue, four at a time, whatever
its length; a client sends several requests to keep more in flight), while the server would
hold all its images and answers at once and read every header of it on the event loop.

Up to one batch of images becomes one batch, run in place. More go through the data plane in
chunks of ``max_batch_size``: each chunk is decoded when its turn comes, while the chunks
before it run, so other clients' requests are decoded and queued in between and the request's
decoded images are never all in memory at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from service.classification import dense
from service.classification.chunks import CHUNKS_IN_FLIGHT, ChunkedInference, held
from service.classification.inputs import ImageInput, ImageInputs
from service.classification.labels import DEFAULT_TOP_K, Labelled, labels_of, top
from service.classification.lookup import ModelLookup, ModelRef
from service.core.errors import InvalidArgument, ResourceExhausted
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["IMAGES_PER_BATCH", "Classify"]

IMAGES_PER_BATCH = CHUNKS_IN_FLIGHT
"""The default image limit of a Classify, in the model's batches (see the module docstring)."""


def same_shape(tensors: Sequence[np.ndarray], first: tuple[int, ...], start: int = 0) -> None:
    """Refuse images of different shapes: one request's images become one batch.

    ``tensors`` are the request's images from index ``start``; ``first`` is image 0's shape.
    A model with a dynamic height or width takes any, but one per request.
    """
    for index, tensor in enumerate(tensors, start):
        if tensor.shape != first:
            raise InvalidArgument(
                f"image {index} is {list(tensor.shape)} but image 0 is {list(first)}; the "
                "images of one request must share a shape"
            )


class Classify:
    """The Classify call (see the module docstring).

    Args:
        lookup: finds the model a request names.
        inputs: decodes and checks images.
        plane: the data plane every chunk goes through.
        max_images: the most images one request may carry (0: see :meth:`image_limit`).
    """

    def __init__(
        self, lookup: ModelLookup, inputs: ImageInputs, plane: DataPlane, max_images: int = 0
    ) -> None:
        self._lookup = lookup
        self._inputs = inputs
        self._plane = plane
        self._max_images = max_images

    def image_limit(self, model: ServedModel) -> int:
        """The most images one request to ``model`` may carry."""
        return self._max_images or (model.max_batch_size or 1) * IMAGES_PER_BATCH

    async def run(
        self,
        ref: ModelRef,
        inputs: Sequence[ImageInput],
        top_k: int,
        deadline: float | None,
        outcome: Outcome,
    ) -> tuple[ServedModel, list[list[Labelled]]]:
        """The model that answered, and the top-k labels per image, in order."""
        model = self._lookup.classifier(ref, outcome)
        if not inputs:
            raise InvalidArgument("no images in the request")
        self._check_count(model, len(inputs))
        step = model.max_batch_size or 1
        # Decoding, then possibly several chunks: all on this version.
        with held(outcome, deadline, model):
            chunks = ChunkedInference(self._plane, deadline, outcome)
            opened = await self._inputs.open_all(model, inputs, step)
            if len(inputs) <= step:  # one batch, in place: a task costs loop turns
                tensors = await self._inputs.window_tensors(model, inputs, opened)
                same_shape(tensors, tensors[0].shape)
                scores = await chunks.rows(model, np.stack(tensors))
            else:
                first: list[tuple[int, ...]] = []  # image 0's shape, once chunk 0 is decoded

                async def decoded(start: int, stop: int) -> np.ndarray:
                    if start:  # the chunk before may have been decoded here: others' turn
                        await asyncio.sleep(0)
                    part = await self._inputs.window_tensors(
                        model, inputs[start:stop], opened[start:stop]
                    )
                    first[:] = first or [part[0].shape]
                    same_shape(part, first[0], start)
                    return np.stack(part)

                scores = np.concatenate(await chunks.stream(model, len(inputs), decoded))
        labels = labels_of(model.info, scores.shape[1])
        k = top_k or DEFAULT_TOP_K
        return model, [top(dense.softmax(row[:, None])[:, 0], k, labels) for row in scores]

    def _check_count(self, model: ServedModel, count: int) -> None:
        """Refuse more images than one request to ``model`` may carry, before reading any."""
        limit = self.image_limit(model)
        if count <= limit:
            return
        how = (
            "--max-images-per-request"
            if self._max_images
            else f"its max_batch_size {model.max_batch_size or 1} x {IMAGES_PER_BATCH}; "
            "--max-images-per-request sets another"
        )
        raise ResourceExhausted(
            f"the request carries {count} images; model '{model.name}' takes at most {limit} "
            f"per Classify ({how}): send them in several requests"
        )
