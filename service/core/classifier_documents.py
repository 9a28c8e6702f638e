"""The JSON documents of the Classifier's answers, as ``convserve classify --json`` prints them.

The command-line client prints them and the REST routes (``/v2/models/{m}/classify`` and
``classify_dense``) answer with them, so both say the same thing in the same shape: the shapes
docs/dense.md describes. Probabilities are the replies' float32 values rounded to 6 digits.

Each function reads a reply message of ``convserve.v1.Classifier`` by its fields alone, and its
enums by name through the message's own descriptor: the client (tools) and the REST routes
(wire) share this module, and the only room both may import without the generated stubs is
this one.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["classify_documents", "dense_document", "map_document", "pool_name", "short_names"]

# A map's arrays, as numpy names their dtypes (little-endian, as classifier.proto says).
_FLOAT32, _FLOAT16, _UINT8, _UINT16 = "<f4", "<f2", "|u1", "<u2"


def _enum_name(message: Any, field: str) -> str:
    """The name of enum ``field``'s value (``POOL_MAX``), or its number for one unknown here."""
    values = message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number
    number = getattr(message, field)
    return str(values[number].name) if number in values else str(number)


def short_names(enum: Any) -> dict[int, str]:
    """An enum's value names by number, without the enum's prefix, in lower case.

    ``enum`` is the enum's descriptor: ``MapFormat``'s ``MAP_FORMAT_TOP_K`` is ``top_k``.
    """
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return {v.number: str(v.name).removeprefix(prefix).lower() for v in enum.values}


def classify_documents(reply: Any, images: Sequence[str | None]) -> list[dict[str, Any]]:
    """The documents of a ``ClassifyResponse``: one per image, in order.

    Args:
        reply: the ``ClassifyResponse``.
        images: what names each image (its file, or None where nothing does).
    """
    return [
        {
            "image": image,
            "model": reply.model,
            "version": reply.version,
            "top": [
                {"label": e.label, "index": e.index, "probability": round(e.probability, 6)}
                for e in result.top
            ],
        }
        for image, result in zip(images, reply.results, strict=True)
    ]


def dense_document(reply: Any, image: str | None) -> dict[str, Any]:
    """The document of a ``ClassifyDenseResponse`` for the image ``image`` names."""
    geometry = reply.geometry
    return {
        "image": image,
        "model": reply.model,
        "version": reply.version,
        "mode": "crops" if _enum_name(reply, "mode") == "MODE_CROPS" else "dense",
        "map_shape": list(reply.map.shape),
        "stride": list(geometry.stride),
        "window": list(geometry.window),
        "offset": list(geometry.offset),
        "exact": geometry.exact,
        "pool": pool_name(reply),
        "top": [
            {
                "label": e.label,
                "index": e.index,
                "probability": round(e.probability, 6),
                "best_cell": list(e.best_cell),
                "box": list(e.box),
            }
            for e in reply.top
        ],
    }


def pool_name(reply: Any) -> str:
    """How a ``ClassifyDenseResponse``'s labels were pooled over the map: ``mean`` or ``max``."""
    return "max" if _enum_name(reply, "pool") == "POOL_MAX" else "mean"


def map_document(score_map: Any) -> dict[str, Any]:
    """A ``ScoreMap`` as JSON: its arrays as base64 of their little-endian bytes.

    ``probabilities`` holds the map in its ``format`` (``fp32``, ``fp16`` or ``top_k``), its
    numpy dtype in ``probabilities_dtype``; in top-k form ``top_classes`` holds the class of each
    rank and cell (dtype in ``top_classes_dtype``). Read with ``np.frombuffer(b64decode(data),
    dtype).reshape(shape)``. ``cell_starts`` has, per spatial axis, the pixel of the original
    image where each cell's window starts. Base64 keeps a large map's answer within a third of
    its binary size and quick to write, where a JSON number per value would take three times
    as much.
    """
    names = short_names(score_map.DESCRIPTOR.fields_by_name["format"].enum_type)
    map_format = names.get(score_map.format, "fp32")
    document: dict[str, Any] = {
        "shape": list(score_map.shape),
        "format": map_format,
        "classes": score_map.classes,
        "scale": score_map.scale,
        "cell_starts": [list(axis.starts) for axis in score_map.cell_starts],
    }
    if map_format == "top_k":
        document["top_classes"] = _base64(score_map.top_classes)
        document["top_classes_dtype"] = _UINT8 if score_map.classes <= 256 else _UINT16
        document["probabilities"] = _base64(score_map.top_probabilities)
        document["probabilities_dtype"] = _FLOAT16
    elif map_format == "fp16":
        document["probabilities"] = _base64(score_map.fp16_probabilities)
        document["probabilities_dtype"] = _FLOAT16
    else:
        document["probabilities"] = _base64(score_map.fp32_probabilities)
        document["probabilities_dtype"] = _FLOAT32
    return document


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
