"""``convserve inspect``: the per-layer table of an ONNX classifier, for sizing batches.

Counts follow the CS231n notes' VGG table: the input image plus one output per convolution,
pooling and fully-connected layer (identity pools left out); parameters are every weight of
the graph, attributed to the first layer that reads it. Memory is given in the precision the
file holds (its ``convserve.precision`` document, or its tensors' types): parameters at the bytes
they take in the file, activations at the bytes per value that precision computes in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import onnx

from model_format import (
    DENSE,
    INPUT,
    PRECISION,
    PRECISIONS,
    Precision,
    read_documents,
    read_model_info,
)

from .errors import ExportError
from .geometry import GraphGeometry, analyse
from .summaries import dense_agreement, precision_cost, precision_kind

__all__ = ["BATCH_SIZES", "inspect_file", "render"]

BATCH_SIZES = (1, 8, 32, 128)


def _input_shape(
    model: onnx.ModelProto, metadata: dict[str, object], override: tuple[int, ...] | None
) -> tuple[int, ...]:
    if override is not None:
        return (1, *override)
    described = metadata.get(INPUT)
    if isinstance(described, dict):
        return (1, int(described["channels"]), *(int(w) for w in described["window"]))
    initializers = {t.name for t in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
    if not all(shape):
        raise ExportError(
            f"input '{graph_input.name}' has dynamic dimensions and the file has no convserve "
            "metadata: give --input-shape CxHxW"
        )
    return (1, *shape)


def inspect_file(
    path: Path, input_shape: tuple[int, ...] | None = None
) -> tuple[GraphGeometry, dict[str, object]]:
    """Analyse one ONNX file at its window (or ``input_shape``, without the batch axis).

    Raises:
        ExportError: the file is missing, not ONNX, or its input size cannot be known.
    """
    if not path.is_file():
        raise ExportError(f"model file '{path}' does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"'{path}' is not a readable ONNX model ({exc})") from exc
    metadata = read_documents({p.key: p.value for p in model.metadata_props})
    try:
        found = analyse(model, _input_shape(model, metadata, input_shape))
    except (ValueError, StopIteration, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"cannot analyse '{path}': {exc}") from exc
    return found, metadata


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _precision(found: GraphGeometry, metadata: dict[str, object]) -> Precision:
    described = metadata.get(PRECISION)
    if isinstance(described, dict):
        recorded = read_model_info({PRECISION: json.dumps(described)}).precision
        if recorded is not None and recorded.name in PRECISIONS:
            return recorded
    return Precision.named(found.precision)


def render(
    found: GraphGeometry, metadata: dict[str, object], batch_sizes: Sequence[int] = BATCH_SIZES
) -> str:
    """The table, totals, batch sizing, precision, dense geometry and uneven layers, as text."""
    precision = _precision(found, metadata)
    name, per_value = precision.name, precision.activation_bytes
    lines = [
        f"{'layer':<48} {'op':<18} {'output':>16} {'params':>13} {'activations':>12} {name:>10}"
    ]
    for layer in found.layers:
        shape = "x".join(map(str, layer.shape))
        lines.append(
            f"{layer.name[-48:]:<48} {layer.op:<18} {shape:>16} {layer.params:>13,} "
            f"{layer.activations:>12,} {_mb(layer.activations * per_value):>10}"
        )
    params, weights = found.total_params, found.total_param_bytes
    acts = found.total_activations
    lines += [
        "",
        f"parameters: {params:,} ({_mb(weights)} as stored, {name})",
        f"activations per image: {acts:,} values ({_mb(acts * per_value)} {name}), forward pass",
        f"precision: {precision_kind(precision)}",
        f"  {precision_cost(precision)}",
        "",
        f"{'batch':>6} {name + ' weights+activations':>26}",
    ]
    for batch in batch_sizes:
        lines.append(f"{batch:>6} {_mb(weights + batch * acts * per_value):>26}")
    dense = metadata.get(DENSE)
    lines.append("")
    if isinstance(dense, dict):
        lines.append(
            f"dense geometry: stride {dense.get('stride')}, window {dense.get('window')}, "
            f"offset {dense.get('offset')}, receptive field {dense.get('receptive_field')}; "
            + dense_agreement(
                bool(dense.get("exact")),
                float(dense.get("max_abs_dev", "nan")),
                float(dense.get("top1_agreement", "nan")),
            )
        )
    else:
        lines.append(
            f"sliding geometry of this graph: stride {list(found.stride)}, receptive "
            f"field {found.receptive_field} (no {DENSE} metadata)"
        )
    if found.uneven:
        lines.append("layers whose geometry does not divide evenly:")
        lines += [f"  {layer.describe()}" for layer in found.uneven]
    else:
        lines.append("every layer's geometry divides evenly")
    return "\n".join(lines)
