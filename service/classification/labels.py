"""Class labels and the top-k ranking that Classify and ClassifyDense answer with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_format import ModelInfo

__all__ = ["DEFAULT_TOP_K", "Labelled", "labels_of", "top"]

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Labelled:
    """A class with its probability, and for dense results where it peaks."""

    label: str
    index: int
    probability: float
    best_cell: tuple[int, ...] = ()
    box: tuple[int, ...] = ()


def labels_of(info: ModelInfo, classes: int) -> Sequence[str]:
    """The model's labels, or the class indices as text where it has none for ``classes``."""
    return (
        info.labels
        if info.labels and len(info.labels) == classes
        else [str(i) for i in range(classes)]
    )


def top(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[Labelled]:
    """The ``k`` most probable classes of a ``[K]`` vector, highest first (ties by index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Labelled(labels[i], int(i), float(probabilities[i])) for i in order]
