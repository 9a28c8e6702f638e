"""Classify: the top-k labels of every image of a request, from the logical model.

The images become one batch (tiny ones decoded on the loop, the rest on decoding threads);
more images than the model's ``max_batch_size`` go through the data plane in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.classification import dense
from service.classification.chunks import ChunkedInference, held
from service.classification.inputs import ImageInput, ImageInputs
from service.classification.labels import DEFAULT_TOP_K, Labelled, labels_of, top
from service.classification.lookup import ModelLookup, ModelRef
from service.core.errors import InvalidArgument
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["Classify"]


def same_shape(tensors: Sequence[np.ndarray]) -> None:
    """Refuse images of different shapes: one request's images become one batch.

    A model with a dynamic height or width takes any, but one per request.
    """
    first = tensors[0].shape
    for index, tensor in enumerate(tensors):
        if tensor.shape != first:
            raise InvalidArgument(
                f"image {index} is {list(tensor.shape)} but image 0 is {list(first)}; the "
                "images of one request must share a shape"
            )


class Classify:
    """The Classify call (see the module docstring)."""

    def __init__(self, lookup: ModelLookup, inputs: ImageInputs, plane: DataPlane) -> None:
        self._lookup = lookup
        self._inputs = inputs
        self._plane = plane

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
        # Decoding, then possibly several chunks: all on this version.
        with held(model):
            tensors = await self._inputs.tensors(model, inputs)
            same_shape(tensors)
            chunks = ChunkedInference(self._plane, deadline, outcome)
            scores = await chunks.rows(model, np.stack(tensors))
        labels = labels_of(model.info, scores.shape[1])
        k = top_k or DEFAULT_TOP_K
        return model, [top(dense.softmax(row[:, None])[:, 0], k, labels) for row in scores]
