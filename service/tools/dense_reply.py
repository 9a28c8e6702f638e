"""A ClassifyDense reply for people: one class's map, the heat-map.

Its JSON document (``--json``) is :func:`service.core.classifier_documents.dense_document`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service._generated.convserve.v1 import classifier_pb2 as pb

__all__ = [
    "ReplyError",
    "class_name",
    "class_plane",
    "pick_class",
    "write_heatmap",
]


class ReplyError(Exception):
    """The reply cannot give what was asked of it (a class it does not hold, a 1-D heat-map)."""


def class_name(label: str, index: int) -> str:
    """A label, or ``class N`` for a model without labels (its labels are the indices)."""
    return f"class {index}" if label == str(index) else label


def pick_class(reply: pb.ClassifyDenseResponse, wanted: str | None) -> tuple[int, str]:
    """The index and name of the class a heat-map shows.

    ``wanted`` is a label among the pooled top-k, or a class index; None takes the top class.
    """
    if wanted is None:
        best = reply.top[0]
        return best.index, class_name(best.label, best.index)
    for entry in reply.top:
        if entry.label == wanted:
            return entry.index, class_name(entry.label, entry.index)
    if wanted.isdigit() and int(wanted) < reply.map.shape[0]:
        index = int(wanted)
        names = {e.index: e.label for e in reply.top}
        return index, class_name(names.get(index, str(index)), index)
    raise ReplyError(
        f"--heatmap-class {wanted!r} is not among the {len(reply.top)} pooled classes; "
        "give its index or a larger --top-k"
    )


def class_plane(reply: pb.ClassifyDenseResponse, index: int) -> np.ndarray:
    """The map of class ``index``: its probability at each cell."""
    shape = tuple(reply.map.shape)
    probabilities = np.frombuffer(reply.map.fp32_probabilities, np.float32).reshape(shape)
    plane: np.ndarray = probabilities[index]
    return plane


def write_heatmap(
    image_bytes: bytes, reply: pb.ClassifyDenseResponse, target: Path, wanted: str | None
) -> str:
    """Draw class ``wanted`` (default: the top pooled class) over the image; returns its name."""
    from service.core.classifier_documents import pool_name
    from service.tools.heatmap import CellLayout, render_heatmap

    index, name = pick_class(reply, wanted)
    plane = class_plane(reply, index)
    if plane.ndim != 2:
        raise ReplyError("heat-maps need a 2-D map (this model's map has one axis)")
    scale = reply.map.scale or 1.0
    layout = CellLayout(
        rows=list(reply.map.cell_starts[0].starts),
        columns=list(reply.map.cell_starts[1].starts),
        window=(round(reply.geometry.window[0] / scale), round(reply.geometry.window[1] / scale)),
    )
    pooled = next((e.probability for e in reply.top if e.index == index), None)
    how = pool_name(reply)
    title = (name if name == f"class {index}" else f"{name} (class {index})") + (
        f": {how}-pooled {pooled:.1%}" if pooled is not None else ""
    )
    render_heatmap(image_bytes, plane, layout, title).save(target, format="PNG")
    return name
