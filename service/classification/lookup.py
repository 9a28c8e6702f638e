"""Which served models a classification request names: logical models and their dense twins.

A logical model ``<name>`` is the classifier; ``<name>_dense`` is its dense twin at the same
version. Requests name the logical model; ClassifyDense picks the twin itself. Both lookups go
through the data plane, so a draining server refuses them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.core.errors import InvalidArgument, ModelNotFound
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import DENSE_SUFFIX, ServedModel

__all__ = ["ModelLookup", "ModelRef"]


@dataclass(frozen=True)
class ModelRef:
    """A model as a request names it: ``name`` ("" for the only one served) and ``version``."""

    name: str = ""
    version: str = ""


class ModelLookup:
    """Logical models and dense twins, looked up through the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    def logical_models(self) -> list[ServedModel]:
        """The highest served version of every logical model (no dense twins)."""
        repository = self._plane.repository
        names = sorted({m.name for m in repository.served() if not m.dense})
        return [repository.get(name) for name in names]

    def models_with_twins(self) -> list[tuple[ServedModel, ServedModel | None]]:
        """Every logical model with its dense twin at the same version, if served."""
        pairs = []
        for model in self.logical_models():
            try:
                twin = self._plane.repository.get(model.name + DENSE_SUFFIX, str(model.version))
            except ModelNotFound:
                twin = None
            pairs.append((model, twin))
        return pairs

    def classifier(self, ref: ModelRef, outcome: Outcome) -> ServedModel:
        """The logical model ``ref`` names, or the only one served when it names none.

        Raises:
            InvalidArgument: no name while several are served, or the name of a dense twin.
            ServingError: unknown model or version, or the server is draining.
        """
        name = ref.name
        if not name:
            served = self.logical_models()
            if len(served) != 1:
                raise InvalidArgument(
                    f"name a model: {len(served)} are served ({', '.join(m.name for m in served)})"
                )
            name = served[0].name
        model = self._plane.model(name, ref.version, outcome)
        if model.dense:
            raise InvalidArgument(
                f"use the logical model name "
                f"'{model.name.removesuffix(DENSE_SUFFIX)}'; the dense twin "
                "is chosen by ClassifyDense"
            )
        return model

    def dense_twin(self, model: ServedModel, outcome: Outcome) -> ServedModel:
        """The dense twin of the classifier ``model``, at its version.

        Raises:
            InvalidArgument: the model has no dense twin served.
            ServingError: the server is draining.
        """
        try:
            return self._plane.model(model.name + DENSE_SUFFIX, str(model.version), outcome)
        except ModelNotFound:
            raise InvalidArgument(
                f"model '{model.name}' has no dense variant; use Classify or mode=crops"
            ) from None
