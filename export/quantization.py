"""int8 files: ONNX Runtime's static quantization in QDQ form, one set of ranges for both files.

Weights are int8 per output channel, activations uint8 with ranges calibrated (min-max) on the
classifier. The dense twin is quantized with the same ranges: its tensors carry other names
(the FC-as-conv rewrite re-traces the network), so each twin tensor is matched to the classifier
tensor holding the same values on window-sized inputs, where the twin's map is one cell equal to
the classifier. Matched tensors take the classifier's range; the few left (none in the networks
convserve converts) keep the twin's own calibration on the same inputs. With equal ranges and
equal weights both files compute the same integers, so for a padding-free network every dense
cell is the int8 classifier on its crop, within one step of the output's quantisation.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_format import INPUT_NAME

from .half_precision import check_pinned

__all__ = ["quantize", "shared_tensors", "unshared"]

_BATCH = 16
# Calibration merges its ranges after each chunk of inputs instead of keeping every activation
# of every input in memory (a 224x224 ResNet holds tens of megabytes of them per image). The
# chunks are fed one collect_data call each: the calibrator's own max_intermediate_outputs
# option discards, rather than merges, each full group of batches.
_CHUNK = 64
_MATCH_INPUTS = 4


class _Batches:
    """The calibration reader ONNX Runtime's calibrator asks for one feed at a time."""

    def __init__(self, inputs: np.ndarray) -> None:
        self._feeds = iter(
            [{INPUT_NAME: inputs[i : i + _BATCH]} for i in range(0, len(inputs), _BATCH)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None after the last."""
        return next(self._feeds, None)


class _QuietAdvice(logging.Filter):
    """Drops the quantizer's advice to pre-process the model, printed on every call.

    The exported graphs are already constant-folded with batch norms fused, which is what
    that pre-processing would do.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Please consider") and "pre-processing" in message)


@contextmanager
def _quiet() -> Iterator[None]:
    advice = _QuietAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def unshared(source: Path, target: Path) -> Path:
    """Write ``source`` to ``target`` with every initializer alias made a tensor of its own.

    The exporter shares equal weights through Identity nodes (the zero biases of an untrained
    network's convolutions). A quantized bias is tied to its own layer's input and weight
    scales, and ONNX Runtime fuses a quantized convolution only when its bias comes straight
    from a DequantizeLinear, so each layer gets its own copy.
    """
    model = onnx.load(str(source))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    aliases = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in weights]
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(weights[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    onnx.save(model, str(target))
    return target


def _calibrate(path: Path, inputs: np.ndarray, scratch: Path) -> Any:
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        path,
        augmented_model_path=str(scratch / f"augmented-{path.name}"),
        calibrate_method=CalibrationMethod.MinMax,
    )
    for start in range(0, len(inputs), _CHUNK):
        calibrator.collect_data(_Batches(inputs[start : start + _CHUNK]))
    return calibrator.compute_data()


def _intermediates(path: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every float tensor the graph computes on ``inputs``, by name, the input included."""
    from .onnx_export import ort_session

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    typed = {v.name: v for v in model.graph.value_info}
    present = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            info = typed.get(name)
            floats = info is not None and info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            if info is not None and floats and name not in present:
                model.graph.output.append(info)
                present.add(name)
    with tempfile.TemporaryDirectory() as scratch:
        exposed = Path(scratch) / "exposed.onnx"
        onnx.save(model, str(exposed))
        session: Any = ort_session(exposed)
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {INPUT_NAME: inputs})
    return {INPUT_NAME: inputs, **dict(zip(names, values, strict=True))}


def _same(first: np.ndarray, second: np.ndarray) -> bool:
    # Gemm and the convolution replacing it add in another order: equal up to rounding.
    scale = max(1.0, float(np.max(np.abs(second))) if second.size else 1.0)
    return first.shape == second.shape and float(np.max(np.abs(first - second))) <= 1e-4 * scale


def shared_tensors(classifier: Path, dense: Path, inputs: np.ndarray) -> dict[str, str]:
    """Twin tensor name to the classifier tensor holding the same values, on window inputs.

    A tensor is compared per input, flattened: the twin's ``[N, K, 1, 1]`` head output is the
    classifier's ``[N, K]``. Where several classifier tensors match (a flatten's input and
    output), the first in graph order is taken: their ranges are equal.
    """
    count = len(inputs)

    def per_input(value: np.ndarray) -> bool:
        return bool(value.ndim) and value.shape[0] == count

    ours = _intermediates(classifier, inputs)
    theirs = {n: v.reshape(count, -1) for n, v in ours.items() if per_input(v)}
    # A tensor without the batch axis first is a constant (a Constant node's scalar, such as
    # ReLU6's clip bounds), not an activation: it matches the classifier's equal constant.
    constants = {n: v for n, v in ours.items() if not per_input(v)}
    matched: dict[str, str] = {}
    for name, value in _intermediates(dense, inputs).items():
        if per_input(value):
            row = value.reshape(count, -1)
            match = next((n for n, other in theirs.items() if _same(row, other)), None)
        else:
            match = next(
                (
                    n
                    for n, other in constants.items()
                    if other.shape == value.shape and np.array_equal(other, value)
                ),
                None,
            )
        if match is not None:
            matched[name] = match
    return matched


def _quantize(source: Path, target: Path, ranges: Any, scratch: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = scratch / f"ranges-{source.name}.json"
    save_tensors_data(ranges, cache)
    quantize_static(
        str(source),
        str(target),
        None,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibration_cache_path=cache,
    )
    check_pinned(onnx.load(str(target)), "int8")


def quantize(
    pair: tuple[Path, Path | None], targets: tuple[Path, Path | None], calibration: np.ndarray
) -> tuple[int, int]:
    """Write the int8 classifier (and dense twin) of the fp32 ``pair`` to ``targets``.

    Args:
        pair: the fp32 ``model.onnx`` and ``model.dense.onnx`` (None: no dense twin).
        targets: where the int8 files go, in the same order.
        calibration: window-sized preprocessed inputs the ranges are calibrated on.

    Returns:
        How many of the twin's calibrated tensors took the classifier's range, and of how many
        (0 and 0 without a twin).
    """
    with tempfile.TemporaryDirectory() as folder, _quiet():
        scratch = Path(folder)
        classifier = unshared(pair[0], scratch / "classifier.onnx")
        dense = None if pair[1] is None else unshared(pair[1], scratch / "dense.onnx")
        ranges = _calibrate(classifier, calibration, scratch)
        _quantize(classifier, targets[0], ranges, scratch)
        if dense is None or targets[1] is None:
            return 0, 0
        twin = _calibrate(dense, calibration, scratch)
        matched = shared_tensors(classifier, dense, calibration[:_MATCH_INPUTS])
        shared = {t: c for t, c in matched.items() if t in twin.data and c in ranges.data}
        for name, theirs in shared.items():
            twin[name] = ranges[theirs]
        _quantize(dense, targets[1], twin, scratch)
    return len(shared), len(twin.data)
