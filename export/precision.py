"""An entry in a reduced precision (fp16 or int8), made from its fp32 files and measured.

The fp32 classifier and dense twin are exported and checked first; this module converts both
(:mod:`export.half_precision`, :mod:`export.quantization`), compares the reduced classifier
with the fp32 one on held-out inputs (top-1 agreement, largest score deviation), checks the
reduced dense map against the reduced classifier crop by crop, and stores what it measured in
the files' ``convserve.precision`` document. Nothing reaches the target folder unless every
check passes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_format import (
    DENSE,
    DENSE_FILE,
    INPUT_NAME,
    MODEL_FILE,
    PRECISION,
    PRECISIONS,
    ModelInfo,
    Precision,
    Preprocess,
    read_documents,
    read_model_info,
)

from .calibration import Samples, folder_samples, random_samples
from .dense_check import (
    DenseCheck,
    DensePair,
    check_dense,
    check_sizes,
    output_step,
    within_one_step,
)
from .errors import ExportError
from .onnx_export import ort_session, write_metadata

__all__ = ["PrecisionReport", "PrecisionSpec", "agreement", "derive"]

Progress = Callable[[str], None]
_BATCH = 32


@dataclass(frozen=True)
class PrecisionSpec:
    """The precision an export writes and how its cost is measured.

    Attributes:
        name: ``fp32``, ``fp16`` or ``int8``.
        calibration: a folder of images: int8 ranges are calibrated on most of them, and one
            in five is held out to measure the cost on. None: see ``random``.
        random: calibrate and measure on random inputs, fit for timing, not for accuracy; the
            agreement is printed and does not fail the export.
        samples: calibration inputs, at most.
        min_top1_agreement: the export fails below this top-1 agreement with fp32.
    """

    name: str = "fp32"
    calibration: Path | None = None
    random: bool = False
    samples: int = 128
    min_top1_agreement: float = 0.99

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.name == "fp32" and (self.calibration is not None or self.random):
            raise ExportError("--calibration goes with --precision fp16 or int8")
        if self.calibration is not None and self.random:
            raise ExportError("--calibration is a folder of images or 'random', not both")
        if self.samples < 1:
            raise ExportError(f"--calibration-samples must be at least 1, got {self.samples}")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ExportError(
                f"--min-top1-agreement must be within [0, 1], got {self.min_top1_agreement:g}"
            )

    def inputs(self, preprocess: Preprocess, input_shape: tuple[int, ...]) -> Samples:
        """The calibration and held-out inputs this spec names, preprocessed for the model.

        Raises:
            ExportError: int8 with neither a calibration folder nor random inputs named, or a
                folder that cannot be read.
        """
        if self.name == "int8" and self.calibration is None and not self.random:
            raise ExportError(
                "--precision int8 needs --calibration DIR (images the ranges are calibrated "
                "on) or --calibration random (fit for timing, not for accuracy)"
            )
        if self.calibration is not None:
            return folder_samples(self.calibration, preprocess, input_shape, self.samples)
        return random_samples(preprocess, input_shape, self.samples)


@dataclass(frozen=True)
class PrecisionReport:
    """What a reduced precision cost, as written into the files.

    Attributes:
        record: the ``convserve.precision`` document.
        check: the reduced dense map against the reduced classifier crop by crop (None without
            a dense twin).
        shared_ranges: int8: how many of the twin's calibrated tensors took the classifier's
            ranges, and of how many.
        random: measured on random inputs: printed, not enforced.
    """

    record: Precision
    check: DenseCheck | None
    shared_ranges: tuple[int, int]
    random: bool


def _scores(path: Path, inputs: np.ndarray) -> np.ndarray:
    session: Any = ort_session(path)
    rows = [
        session.run(None, {INPUT_NAME: inputs[i : i + _BATCH]})[0]
        for i in range(0, len(inputs), _BATCH)
    ]
    return np.concatenate(rows)


def agreement(reference: Path, reduced: Path, inputs: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and largest absolute score difference of two classifiers on ``inputs``."""
    expected, got = _scores(reference, inputs), _scores(reduced, inputs)
    top1 = float(np.mean(expected.argmax(axis=1) == got.argmax(axis=1)))
    return top1, float(np.max(np.abs(expected - got)))


def _convert(
    name: str, pair: tuple[Path, Path | None], staged: tuple[Path, Path | None], samples: Samples
) -> tuple[int, int]:
    if name == "int8":
        from .quantization import quantize

        return quantize(pair, staged, samples.calibration)
    from .half_precision import to_fp16

    for source, target in zip(pair, staged, strict=True):
        if source is not None and target is not None:
            onnx.save(to_fp16(onnx.load(str(source))), str(target))
    return 0, 0


def _check_twin(staged: tuple[Path, Path], info: ModelInfo, name: str) -> DenseCheck:
    if info.dense is None or info.channels is None:
        raise ExportError("the fp32 files carry no dense geometry to check the twin against")
    pair = DensePair(staged[0], staged[1], info.channels, info.dense.window, info.dense.stride)
    sizes = check_sizes(info.dense.window, info.dense.stride)
    check = check_dense(pair, sizes, np.random.default_rng(0))
    if name == "int8":
        within, step = within_one_step(pair, check)
        if info.dense.exact and not within:
            raise ExportError(
                f"the int8 dense map of a padding-free network differs from the int8 "
                f"classifier on its crops by {check.max_abs_dev:.3g}, more than one output "
                f"quantisation step ({step:.3g}): the int8 twin is not crop-equivalent"
            )
    return check


def _measure(spec: PrecisionSpec, reference: Path, staged: Path, samples: Samples) -> Precision:
    top1, deviation = agreement(reference, staged, samples.held_out)
    if top1 < spec.min_top1_agreement and not samples.random:
        raise ExportError(
            f"{spec.name} agrees with fp32 on {top1:.1%} of {samples.held_out_source} (top-1), "
            f"under --min-top1-agreement {spec.min_top1_agreement:.1%}; calibrate on more "
            "representative images, or keep a higher precision"
        )
    return dataclasses.replace(
        Precision.named(spec.name),
        top1_agreement=top1,
        max_abs_dev=deviation,
        evaluated_on=samples.held_out_source,
        samples=len(samples.held_out),
        calibration=samples.calibration_source if spec.name == "int8" else None,
        output_step=output_step(staged) if spec.name == "int8" else None,
    )


def _own_metadata(path: Path, kept: dict[str, str]) -> onnx.ModelProto:
    """The file at ``path`` with only the metadata keys of its fp32 source.

    The quantizer marks its output with a key of its own (``onnx.infer``) that is not JSON.
    """
    model = onnx.load(str(path))
    props = [(p.key, p.value) for p in model.metadata_props if p.key in kept]
    del model.metadata_props[:]
    for key, value in props:
        model.metadata_props.add(key=key, value=value)
    return model


def derive(
    source: Path,
    target: Path,
    spec: PrecisionSpec,
    samples: Samples,
    progress: Progress = lambda _step: None,
) -> PrecisionReport:
    """Write ``target``'s files in ``spec.name`` from the fp32 entry files in ``source``.

    ``target`` may be ``source``: the fp32 files are read before anything is replaced.

    Raises:
        ExportError: a check failed (agreement under ``spec.min_top1_agreement`` on real data,
            an int8 dense cell of a padding-free network more than one output step from its
            crop) or the converted files leave the pinned IR version and opset.
    """
    dense = source / DENSE_FILE
    pair = (source / MODEL_FILE, dense if dense.is_file() else None)
    metadata = {p.key: p.value for p in onnx.load(str(pair[0])).metadata_props}
    documents = read_documents(metadata)
    with tempfile.TemporaryDirectory() as folder:
        staged = (Path(folder) / MODEL_FILE, Path(folder) / DENSE_FILE if pair[1] else None)
        progress(f"writing the {spec.name} files")
        shared = _convert(spec.name, pair, staged, samples)
        progress(f"measuring {spec.name} against fp32 on {samples.held_out_source}")
        record = _measure(spec, pair[0], staged[0], samples)
        check = None
        if staged[1] is not None:
            progress(f"checking {spec.name} dense cells against crop-by-crop evaluation")
            check = _check_twin((staged[0], staged[1]), read_model_info(metadata), spec.name)
            recorded = documents.get(DENSE)
            if isinstance(recorded, dict):
                documents[DENSE] = {
                    **recorded,
                    "max_abs_dev": check.max_abs_dev,
                    "top1_agreement": check.top1_agreement,
                }
        documents[PRECISION] = dataclasses.asdict(record)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create '{target}': {exc.strerror}") from exc
        for path in staged:
            if path is not None:
                write_metadata(_own_metadata(path, metadata), target / path.name, documents)
    return PrecisionReport(record, check, shared, samples.random)
