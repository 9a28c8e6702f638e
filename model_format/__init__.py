"""The model-repository file format: the one thing ``export/`` and ``service/`` share.

Standard library only. ``export/`` writes through this module and ``service/`` reads through it;
the ``convserve.*`` metadata keys are spelled here and nowhere else.

Layout::

    <repository>/<model-name>/<version>/model.onnx         version: a positive integer
    <repository>/<model-name>/<version>/model.dense.onnx   optional dense variant
    <repository>/<model-name>/config.json                  optional serving knobs

Each ONNX file's ``metadata_props`` hold one JSON document per key: :data:`LABELS`,
:data:`INPUT`, :data:`PREPROCESS`, :data:`DENSE`, :data:`PRECISION` and :data:`SOURCE`. A file
without them still serves over KServe v2 under its own tensor names; the metadata adds labels,
preprocessing, the dense geometry and the numeric precision the file is stored in.

The dense arithmetic: along an axis ``W`` pixels long, a dense map has
``(W - window) * d // stride + 1`` cells (``d`` the stride divisor, 1 for one pass), and cell
``i`` stands for the crop starting at ``offset + i * stride / d``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "DENSE",
    "DENSE_FILE",
    "INPUT",
    "INPUT_NAME",
    "LABELS",
    "MODEL_FILE",
    "OUTPUT_NAME",
    "PRECISION",
    "PRECISIONS",
    "PREFIX",
    "PREPROCESS",
    "SOURCE",
    "DenseGeometry",
    "ModelInfo",
    "Precision",
    "Preprocess",
    "cell_counts",
    "cell_starts",
    "metadata_documents",
    "read_documents",
    "read_model_info",
]

log = logging.getLogger(__name__)

PREFIX = "convserve."
LABELS = PREFIX + "labels"
INPUT = PREFIX + "input"
PREPROCESS = PREFIX + "preprocess"
DENSE = PREFIX + "dense"
SOURCE = PREFIX + "source"
PRECISION = PREFIX + "precision"

MODEL_FILE = "model.onnx"
DENSE_FILE = "model.dense.onnx"
CONFIG_FILE = "config.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

PRECISIONS = {"fp32": (4, 4), "fp16": (2, 2), "int8": (1, 1)}
"""Each precision's bytes per parameter and per activation as the file stores and computes them.

int8 files hold int8 weights (per output channel) and uint8 activations; their biases stay
32-bit integers, and every precision takes fp32 inputs and gives fp32 outputs."""


@dataclass(frozen=True)
class Preprocess:
    """How a client's image becomes the network's input: ``(pixel * scale - mean) / std``.

    Attributes:
        color: ``RGB`` or ``L`` (grayscale).
        scale: multiplies 8-bit pixel values first (1/255 maps them to [0, 1]).
        mean: per-channel value subtracted after scaling.
        std: per-channel divisor applied last.
    """

    color: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def default_for(cls, channels: int) -> Preprocess:
        """Scale to [0, 1], no normalisation, color mode from the channel count."""
        return cls("RGB" if channels == 3 else "L", 1 / 255, (0.0,) * channels, (1.0,) * channels)


@dataclass(frozen=True)
class DenseGeometry:
    """Where each cell of the dense map looks in the input, as measured at export.

    Attributes:
        stride: input pixels between neighbouring cells, per axis.
        window: the crop one cell stands for (the classifier's input size).
        offset: where cell 0's window starts.
        receptive_field: input pixels that can influence one cell (None when a global pooling
            inside the network lets every pixel influence every cell).
        exact: every cell equals the classifier on its crop (padding-free networks).
        max_abs_dev: measured largest difference between a cell and its crop's scores.
        top1_agreement: measured fraction of cells whose best class matches their crop's.
    """

    stride: tuple[int, ...]
    window: tuple[int, ...]
    offset: tuple[int, ...]
    receptive_field: tuple[int, ...] | None
    exact: bool
    max_abs_dev: float
    top1_agreement: float


@dataclass(frozen=True)
class Precision:
    """The numeric precision a file is stored and computed in, and what it cost against fp32.

    Attributes:
        name: ``fp32``, ``fp16`` or ``int8`` (a key of :data:`PRECISIONS`).
        weight_bytes: bytes per parameter as stored.
        activation_bytes: bytes per activation between layers.
        top1_agreement: measured share of held-out inputs whose best class is the fp32 model's
            (None for fp32 itself).
        max_abs_dev: measured largest difference of any score from the fp32 model's.
        evaluated_on: what the held-out inputs were; ``random inputs`` when no data was given.
        samples: how many held-out inputs were measured.
        calibration: for int8, what the activation ranges were calibrated on.
        output_step: for int8, the output's quantisation step: a dense cell of a padding-free
            network is within one step of the classifier on its crop.
    """

    name: str
    weight_bytes: int
    activation_bytes: int
    top1_agreement: float | None = None
    max_abs_dev: float | None = None
    evaluated_on: str | None = None
    samples: int = 0
    calibration: str | None = None
    output_step: float | None = None

    @classmethod
    def named(cls, name: str) -> Precision:
        """``name`` with its bytes per value and nothing measured yet.

        Raises:
            ValueError: ``name`` is not one of :data:`PRECISIONS`.
        """
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{name}'")
        weight_bytes, activation_bytes = PRECISIONS[name]
        return cls(name, weight_bytes, activation_bytes)


@dataclass(frozen=True)
class ModelInfo:
    """convserve's description of a model; every field is None when the file has no metadata.

    Attributes:
        labels: one per class.
        layout: ``NCHW`` or ``NCL``.
        channels: the input's channels.
        window: the classifier's input size, per spatial axis.
        preprocess: how images become input tensors.
        dense: the dense variant's geometry, where there is one.
        precision: what the file is stored and computed in; None for a file that does not say
            (its tensors' types tell).
    """

    labels: tuple[str, ...] | None = None
    layout: str | None = None
    channels: int | None = None
    window: tuple[int, ...] | None = None
    preprocess: Preprocess | None = None
    dense: DenseGeometry | None = None
    precision: Precision | None = None

    @property
    def precision_name(self) -> str:
        """The precision the file is served in: ``fp32``, ``fp16`` or ``int8``.

        A file without a :data:`PRECISION` document is taken as ``fp32``: the convserve exports
        that lack the document (it came with ``--precision``) are all fp32 files.
        """
        return self.precision.name if self.precision is not None else "fp32"


def cell_counts(
    size: Sequence[int], window: Sequence[int], stride: Sequence[int], divisor: int = 1
) -> tuple[int, ...]:
    """Cells per axis of the dense map; 0 along an axis where the input is smaller than the window.

    Args:
        size: the input's spatial size.
        window: the classifier's input size.
        stride: the dense map's stride in input pixels.
        divisor: stride divisor ``d``: the map is sampled every ``stride / d`` pixels.
    """
    return tuple(
        (s - w) * divisor // st + 1 if s >= w else 0
        for s, w, st in zip(size, window, stride, strict=True)
    )


def cell_starts(
    counts: Sequence[int],
    stride: Sequence[int],
    divisor: int,
    offset: Sequence[int],
    scale: float = 1.0,
) -> list[list[int]]:
    """Per axis, the pixel where each cell's window starts, in an image ``scale`` times smaller.

    ``scale`` is the factor by which the image was resized before the pass; the starts are
    given in the original image's pixels.
    """
    return [
        [round((o + i * st / divisor) / scale) for i in range(c)]
        for c, st, o in zip(counts, stride, offset, strict=True)
    ]


def metadata_documents(info: ModelInfo, source: Mapping[str, object]) -> dict[str, object]:
    """The ``convserve.*`` JSON documents that describe a model file, keyed by metadata key."""
    documents: dict[str, object] = {}
    if info.labels is not None:
        documents[LABELS] = list(info.labels)
    if info.layout is not None and info.channels is not None and info.window is not None:
        documents[INPUT] = {
            "layout": info.layout,
            "channels": info.channels,
            "window": list(info.window),
        }
    if info.preprocess is not None:
        documents[PREPROCESS] = _lists(asdict(info.preprocess))
    documents[SOURCE] = dict(source)
    if info.dense is not None:
        documents[DENSE] = _lists(asdict(info.dense))
    if info.precision is not None:
        documents[PRECISION] = asdict(info.precision)
    return documents


def read_documents(metadata: Mapping[str, str]) -> dict[str, object]:
    """Every ``convserve.*`` entry of ``metadata``, parsed as JSON where it is JSON."""
    documents: dict[str, object] = {}
    for key, raw in metadata.items():
        if key.startswith(PREFIX):
            try:
                documents[key] = json.loads(raw)
            except json.JSONDecodeError:
                documents[key] = raw
    return documents


def read_model_info(metadata: Mapping[str, str]) -> ModelInfo:
    """Parse the ``convserve.*`` keys; a malformed entry is logged and the whole info left empty."""
    documents = read_documents(metadata)
    for key in (LABELS, INPUT, PREPROCESS, DENSE, PRECISION):
        if isinstance(documents.get(key), str):
            log.warning("ignoring metadata %s: not JSON", key)
    try:
        return ModelInfo(
            labels=_labels(documents.get(LABELS)),
            **_input(documents.get(INPUT)),
            preprocess=_preprocess(documents.get(PREPROCESS)),
            dense=_dense(documents.get(DENSE)),
            precision=_precision(documents.get(PRECISION)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("ignoring malformed convserve metadata (%s)", exc)
        return ModelInfo()


def _lists(document: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in document.items()}


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _labels(document: object) -> tuple[str, ...] | None:
    return tuple(str(v) for v in document) if isinstance(document, list) else None


def _input(document: object) -> dict[str, Any]:
    if not isinstance(document, dict):
        return {}
    return {
        "layout": str(document["layout"]),
        "channels": int(document["channels"]),
        "window": _ints(document["window"]),
    }


def _preprocess(document: object) -> Preprocess | None:
    if not isinstance(document, dict):
        return None
    return Preprocess(
        str(document["color"]),
        float(document["scale"]),
        tuple(float(v) for v in document["mean"]),
        tuple(float(v) for v in document["std"]),
    )


def _dense(document: object) -> DenseGeometry | None:
    if not isinstance(document, dict):
        return None
    field = document.get("receptive_field")
    return DenseGeometry(
        stride=_ints(document["stride"]),
        window=_ints(document["window"]),
        offset=_ints(document["offset"]),
        receptive_field=_ints(field) if field is not None else None,
        exact=bool(document["exact"]),
        max_abs_dev=float(document["max_abs_dev"]),
        top1_agreement=float(document["top1_agreement"]),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _precision(document: object) -> Precision | None:
    if not isinstance(document, dict):
        return None
    calibration = document.get("calibration")
    evaluated_on = document.get("evaluated_on")
    return Precision(
        name=str(document["name"]),
        weight_bytes=int(document["weight_bytes"]),
        activation_bytes=int(document["activation_bytes"]),
        top1_agreement=_optional_float(document.get("top1_agreement")),
        max_abs_dev=_optional_float(document.get("max_abs_dev")),
        evaluated_on=None if evaluated_on is None else str(evaluated_on),
        samples=int(document.get("samples", 0)),
        calibration=None if calibration is None else str(calibration),
        output_step=_optional_float(document.get("output_step")),
    )
