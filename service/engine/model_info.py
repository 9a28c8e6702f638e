"""What a model file says about itself: convserve's ``metadata_props``, read defensively.

A plain ONNX model with no convserve metadata serves over KServe v2 under its own tensor names
and types; the metadata only adds labels, preprocessing and the dense geometry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DenseInfo", "ModelInfo", "Preprocess", "read_model_info"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """``(pixel * scale - mean) / std`` per channel, after converting to ``color``."""

    color: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DenseInfo:
    """The dense geometry recorded at export (DESIGN.md section 2)."""

    stride: tuple[int, ...]
    window: tuple[int, ...]
    offset: tuple[int, ...]
    receptive_field: tuple[int, ...] | None
    exact: bool
    max_abs_dev: float
    top1_agreement: float


@dataclass(frozen=True)
class ModelInfo:
    """convserve's description of a model; every field is None when the file has no metadata."""

    labels: tuple[str, ...] | None = None
    layout: str | None = None
    channels: int | None = None
    window: tuple[int, ...] | None = None
    preprocess: Preprocess | None = None
    dense: DenseInfo | None = None


def _json(metadata: Mapping[str, str], key: str) -> object:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        log.warning("ignoring metadata %s: not JSON", key)
        return None


def read_model_info(metadata: Mapping[str, str]) -> ModelInfo:
    """Parse the ``convserve.*`` keys; malformed entries are logged and left out."""
    labels = _json(metadata, "convserve.labels")
    described = _json(metadata, "convserve.input")
    pre = _json(metadata, "convserve.preprocess")
    dense = _json(metadata, "convserve.dense")
    try:
        info = ModelInfo(
            labels=tuple(str(v) for v in labels) if isinstance(labels, list) else None,
            layout=str(described["layout"]) if isinstance(described, dict) else None,
            channels=int(described["channels"]) if isinstance(described, dict) else None,
            window=tuple(int(v) for v in described["window"])
            if isinstance(described, dict)
            else None,
            preprocess=Preprocess(
                str(pre["color"]),
                float(pre["scale"]),
                tuple(float(v) for v in pre["mean"]),
                tuple(float(v) for v in pre["std"]),
            )
            if isinstance(pre, dict)
            else None,
            dense=DenseInfo(
                tuple(int(v) for v in dense["stride"]),
                tuple(int(v) for v in dense["window"]),
                tuple(int(v) for v in dense["offset"]),
                tuple(int(v) for v in dense["receptive_field"])
                if dense.get("receptive_field") is not None
                else None,
                bool(dense["exact"]),
                float(dense["max_abs_dev"]),
                float(dense["top1_agreement"]),
            )
            if isinstance(dense, dict)
            else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring malformed convserve metadata (%s)", exc)
        return ModelInfo()
    return info
