"""The classification API the servicer calls: Classify, ClassifyDense and the model listing.

Both calls go through the same data plane and batchers as KServe v2 requests for the same
model: Classify uses the classifier (``<name>``), ClassifyDense the dense twin (``<name>_dense``)
or, in crops mode, the classifier on every window.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from service.classification.classify import Classify
from service.classification.classify_dense import ClassifyDense, DenseResult
from service.classification.inputs import ImageInput, ImageInputs
from service.classification.labels import Labelled
from service.classification.lookup import ModelLookup, ModelRef
from service.classification.plan import DenseLimits, DenseQuery
from service.core.settings import Settings
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ServedModel

__all__ = ["Classification"]


class Classification:
    """Classify, ClassifyDense and ListModels over one data plane.

    Args:
        plane: the data plane every request goes through.
        settings: the server's image, request and dense limits.
        executor: the decoding threads (decoding, resizing, copies and crops of large images).
    """

    def __init__(self, plane: DataPlane, settings: Settings, executor: Executor) -> None:
        self.lifecycle = plane.lifecycle  # the server's: its door admits each call
        self._lookup = ModelLookup(plane)
        inputs = ImageInputs(settings, executor)
        self._classify = Classify(self._lookup, inputs, plane, settings.max_images_per_request)
        self._dense = ClassifyDense(
            self._lookup, inputs, plane, DenseLimits.from_settings(settings)
        )

    def models_with_twins(self) -> list[tuple[ServedModel, ServedModel | None]]:
        """Every logical model with its dense twin at the same version, if served."""
        return self._lookup.models_with_twins()

    async def classify(
        self,
        ref: ModelRef,
        inputs: Sequence[ImageInput],
        top_k: int,
        deadline: float | None,
        outcome: Outcome,
    ) -> tuple[ServedModel, list[list[Labelled]]]:
        """The model that answered, and the top-k labels per image, in order."""
        return await self._classify.run(ref, inputs, top_k, deadline, outcome)

    async def classify_dense(
        self,
        ref: ModelRef,
        image: ImageInput,
        query: DenseQuery,
        deadline: float | None,
        outcome: Outcome,
    ) -> DenseResult:
        """The class-probability map of one image, and labels pooled over it."""
        return await self._dense.run(ref, image, query, deadline, outcome)
