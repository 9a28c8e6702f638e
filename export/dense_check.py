"""Check the dense map against crop-by-crop evaluation of the classifier, in ONNX Runtime.

Both exported files are run as they will be served: ``model.onnx`` on every crop, one batch at a
time, and ``model.dense.onnx`` once on the whole input. The cell arithmetic is
:func:`model_format.cell_counts`. The same comparison serves every precision; for int8 files
the tolerance is one step of the output's quantisation (:func:`output_step`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from model_format import INPUT_NAME, OUTPUT_NAME, cell_counts

from .onnx_export import ort_session

__all__ = [
    "DenseCheck",
    "DensePair",
    "check_dense",
    "check_sizes",
    "crop_by_crop",
    "dense_map",
    "output_step",
    "within_one_step",
]

_CROP_BATCH = 16


@dataclass(frozen=True)
class DensePair:
    """An entry's two files and the geometry that relates the dense map to crops.

    Attributes:
        model_path: ``model.onnx``, the classifier run on each crop.
        dense_path: ``model.dense.onnx``, run once on the whole input.
        channels: the input's channels.
        window: the classifier's input size, per spatial axis.
        stride: input pixels between neighbouring cells, per axis.
    """

    model_path: Path
    dense_path: Path
    channels: int
    window: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class DenseCheck:
    """How closely the dense map follows crop-by-crop evaluation.

    Attributes:
        sizes: the spatial input sizes checked.
        cells: cells compared, over all sizes.
        max_abs_dev: largest absolute difference of any score in any cell.
        top1_agreement: fraction of cells whose best class is the same both ways.
        max_abs_score: largest absolute crop-by-crop score, to read ``max_abs_dev`` against.
    """

    sizes: tuple[tuple[int, ...], ...]
    cells: int
    max_abs_dev: float
    top1_agreement: float
    max_abs_score: float


def dense_map(
    session: object, image: np.ndarray, window: Sequence[int], stride: Sequence[int]
) -> np.ndarray:
    """Scores ``[K, *cells]`` of the dense model on one ``[C, *size]`` image."""
    scores = session.run(None, {INPUT_NAME: image[None]})[0][0]  # type: ignore[attr-defined]
    cells = cell_counts(image.shape[1:], window, stride)
    if any(got < want for got, want in zip(scores.shape[1:], cells, strict=True)):
        raise ValueError(
            f"the dense model gives a {list(scores.shape[1:])} map for a "
            f"{list(image.shape[1:])} input; the geometry says {list(cells)}"
        )
    return np.ascontiguousarray(scores[(slice(None), *(slice(0, c) for c in cells))])


def crop_by_crop(
    session: object, image: np.ndarray, window: Sequence[int], stride: Sequence[int]
) -> np.ndarray:
    """Scores ``[K, *cells]`` from running the classifier on every crop of one image."""
    cells = cell_counts(image.shape[1:], window, stride)
    positions = list(itertools.product(*(range(c) for c in cells)))
    rows: list[np.ndarray] = []
    for start in range(0, len(positions), _CROP_BATCH):
        crops = np.stack(
            [
                image[
                    (
                        slice(None),
                        *(
                            slice(i * st, i * st + w)
                            for i, st, w in zip(pos, stride, window, strict=True)
                        ),
                    )
                ]
                for pos in positions[start : start + _CROP_BATCH]
            ]
        )
        rows.append(session.run(None, {INPUT_NAME: crops})[0])  # type: ignore[attr-defined]
    scores = np.concatenate(rows)  # [cells, K]
    return np.ascontiguousarray(scores.T.reshape(scores.shape[1], *cells))


def check_dense(
    pair: DensePair, sizes: Iterable[Sequence[int]], rng: np.random.Generator
) -> DenseCheck:
    """Compare both files of ``pair`` on random inputs of the given spatial ``sizes``."""
    classifier, dense = ort_session(pair.model_path), ort_session(pair.dense_path)
    window, stride = pair.window, pair.stride
    worst, scale, agree, total, checked = 0.0, 0.0, 0, 0, []
    for size in sizes:
        image = rng.standard_normal((pair.channels, *size)).astype(np.float32)
        expected = crop_by_crop(classifier, image, window, stride)
        got = dense_map(dense, image, window, stride)
        worst = max(worst, float(np.max(np.abs(got - expected))))
        scale = max(scale, float(np.max(np.abs(expected))))
        agree += int(np.sum(got.argmax(axis=0) == expected.argmax(axis=0)))
        total += int(np.prod(got.shape[1:]))
        checked.append(tuple(size))
    return DenseCheck(tuple(checked), total, worst, agree / total if total else 0.0, scale)


def check_sizes(window: Sequence[int], stride: Sequence[int]) -> list[tuple[int, ...]]:
    """The spatial sizes the dense map is checked at.

    Two sizes: several whole strides, and a size with a partial stride left over, per axis.
    """
    first = tuple(w + 2 * s for w, s in zip(window, stride, strict=True))
    second = tuple(w + s + s // 2 for w, s in zip(window, stride, strict=True))
    if len(window) == 2:
        second = (first[0], second[1])
    return [first, second]


def output_step(path: Path) -> float:
    """The quantisation step of an int8 file's output; 0.0 when the output is not quantized.

    The step is the scale of the DequantizeLinear (or QuantizeLinear) nearest the output.
    """
    graph = onnx.load(str(path)).graph
    constants = {t.name: t for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    node = producers.get(OUTPUT_NAME)
    while node is not None and node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
        if len(node.input) != 1:
            return 0.0  # an operator between the last quantisation and the output
        node = producers.get(node.input[0])
    if node is None or node.input[1] not in constants:
        return 0.0
    return float(np.max(numpy_helper.to_array(constants[node.input[1]])))


def within_one_step(pair: DensePair, check: DenseCheck) -> tuple[bool, float]:
    """Whether an int8 pair's check stays within one output quantisation step, and the step.

    Both files must quantize their output with the same step (they share one set of ranges);
    the comparison allows the step's own float rounding.
    """
    step = output_step(pair.model_path)
    if step <= 0.0 or output_step(pair.dense_path) != step:
        return False, step
    return check.max_abs_dev <= step * (1 + 1e-5), step
