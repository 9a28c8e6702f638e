"""Turn a loaded PyTorch classifier into one model-repository entry, checked at every step.

``<repository>/<name>/<version>/model.onnx`` (dynamic batch axis) and, unless asked not to,
``model.dense.onnx`` (dynamic batch and spatial axes), each carrying the metadata that makes it
servable on its own (the ``convserve.*`` documents of :mod:`model_format`). A reduced precision
is made from the checked fp32 files in a scratch folder (:mod:`export.precision`), so a failed
check leaves nothing in the repository.
"""

from __future__ import annotations

import datetime as dt
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model_format import (
    DENSE_FILE,
    MODEL_FILE,
    DenseGeometry,
    ModelInfo,
    Precision,
    Preprocess,
    metadata_documents,
)

from . import geometry
from .dense_check import DenseCheck, DensePair, check_dense, check_sizes
from .errors import ExportError
from .fc_to_conv import to_dense
from .onnx_export import IR_VERSION, OPSET, max_abs_diff, write_metadata, write_onnx
from .precision import PrecisionReport, PrecisionSpec, derive

__all__ = [
    "ExportReport",
    "ExportSpec",
    "export_entry",
    "next_version",
    "parse_input_shape",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Above this, rounding cannot explain a difference between a dense cell and its crop.
DENSE_EXACT_TOLERANCE = 1e-4

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportSpec:
    """Everything ``convserve export`` was asked to do.

    Attributes:
        source: the model's import path, for provenance.
        input_shape: ``(C, H, W)`` or ``(C, L)``: the classifier's window.
        name: model name in the repository.
        repository: the model repository folder.
        version: version folder to write; None takes the next free one.
        labels: one per class; None names classes by index.
        preprocess: None takes :meth:`Preprocess.default_for`.
        dense: write ``model.dense.onnx`` too.
        parity_tolerance: export fails if ONNX Runtime and PyTorch differ by more.
        weights_sha256: checksum of the weights file, for provenance.
        precision: what the files are stored in and how that precision's cost is measured.
    """

    source: str
    input_shape: tuple[int, ...]
    name: str
    repository: Path
    version: int | None = None
    labels: tuple[str, ...] | None = None
    preprocess: Preprocess | None = None
    dense: bool = True
    parity_tolerance: float = 1e-3
    weights_sha256: str | None = None
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ExportError(
                f"model name '{self.name}' must be letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        if self.version is not None and self.version < 1:
            raise ExportError(f"--version must be a positive integer, got {self.version}")
        if len(self.input_shape) not in (2, 3) or any(d < 1 for d in self.input_shape):
            raise ExportError(
                f"input shape {list(self.input_shape)} must be CxHxW or CxL, all positive"
            )
        if self.preprocess is not None:
            _check_preprocess(self.preprocess, channels=self.input_shape[0])


def _check_preprocess(preprocess: Preprocess, channels: int) -> None:
    if preprocess.color not in ("RGB", "L"):
        raise ExportError(f"--color must be RGB or L, got '{preprocess.color}'")
    if len(preprocess.mean) != len(preprocess.std):
        raise ExportError(
            f"--mean has {len(preprocess.mean)} values but --std {len(preprocess.std)}"
        )
    if any(s == 0 for s in preprocess.std):
        raise ExportError("--std values must not be zero")
    if len(preprocess.mean) != channels:
        raise ExportError(
            f"--mean/--std have {len(preprocess.mean)} values but the input has {channels} channels"
        )


@dataclass
class ExportReport:
    """What an export wrote and measured."""

    model_path: Path
    dense_path: Path | None
    classes: int
    parity_max_abs_diff: float
    dense_parity_max_abs_diff: float | None = None
    geometry: DenseGeometry | None = None
    check: DenseCheck | None = None
    uneven: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    global_pools: list[str] = field(default_factory=list)
    precision: PrecisionReport | None = None
    seconds: float = 0.0
    protos: list[onnx.ModelProto] = field(default_factory=list, repr=False)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x224x224"`` to ``(3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ExportError(
            f"input shape '{text}' must be CxHxW or CxL in whole numbers, e.g. 3x224x224"
        ) from None
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise ExportError(f"input shape '{text}' must be CxHxW or CxL, all positive")
    return shape


def next_version(model_dir: Path) -> int:
    """One more than the highest numeric version folder, or 1."""
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _classes(model: nn.Module, spec: ExportSpec) -> int:
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *spec.input_shape))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{type(model).__name__} does not run on a {'x'.join(map(str, spec.input_shape))} "
            f"input: {first}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(f"{type(model).__name__} returns {shape}; a classifier returns [N, K]")
    return int(out.shape[1])


def _write_dense(
    model: nn.Module,
    spec: ExportSpec,
    path: Path,
    report: ExportReport,
    rng: np.random.Generator,
    progress: Progress,
) -> None:
    progress("converting the classifier to convolutions")
    dense = to_dense(model, spec.input_shape)
    report.converted, report.global_pools = dense.converted, dense.global_pools
    spatial_names = ("height", "width") if len(spec.input_shape) == 3 else ("length",)
    axes = {0: "batch", **{2 + i: n for i, n in enumerate(spatial_names)}}
    progress("writing model.dense.onnx")
    report.protos.append(write_onnx(dense.module, torch.zeros(1, *spec.input_shape), path, axes))
    window = spec.input_shape[1:]
    found = geometry.analyse(report.protos[-1], (1, *spec.input_shape))
    sizes = check_sizes(window, found.stride)
    probe = rng.standard_normal((1, spec.input_shape[0], *sizes[1])).astype(np.float32)
    report.dense_parity_max_abs_diff = max_abs_diff(dense.module, path, [probe])
    if report.dense_parity_max_abs_diff > spec.parity_tolerance:
        raise ExportError(
            f"model.dense.onnx differs from its PyTorch module by "
            f"{report.dense_parity_max_abs_diff:.3g} (tolerance {spec.parity_tolerance:g})"
        )
    progress("checking dense cells against crop-by-crop evaluation")
    pair = DensePair(report.model_path, path, spec.input_shape[0], tuple(window), found.stride)
    check = check_dense(pair, sizes, rng)
    structurally_exact = not found.padded and not found.global_pooling
    if structurally_exact and check.max_abs_dev > DENSE_EXACT_TOLERANCE:
        raise ExportError(
            f"dense map of a padding-free network differs from crop-by-crop evaluation by "
            f"{check.max_abs_dev:.3g}: the conversion is wrong for this network"
        )
    report.check = check
    report.geometry = DenseGeometry(
        stride=found.stride,
        window=tuple(window),
        offset=(0,) * len(window),
        receptive_field=found.receptive_field,
        exact=structurally_exact,
        max_abs_dev=check.max_abs_dev,
        top1_agreement=check.top1_agreement,
    )


def _metadata(spec: ExportSpec, report: ExportReport, labels: Sequence[str]) -> dict[str, object]:
    channels, window = spec.input_shape[0], spec.input_shape[1:]
    info = ModelInfo(
        labels=tuple(labels),
        layout="NCHW" if len(window) == 2 else "NCL",
        channels=channels,
        window=tuple(window),
        preprocess=spec.preprocess or Preprocess.default_for(channels),
        dense=report.geometry,
        precision=Precision.named("fp32"),
    )
    source = {
        "model": spec.source,
        "weights_sha256": spec.weights_sha256,
        "torch": torch.__version__,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parity_max_abs_diff": report.parity_max_abs_diff,
        "dense_parity_max_abs_diff": report.dense_parity_max_abs_diff,
        "uneven_layers": report.uneven,
    }
    return metadata_documents(info, source)


def export_entry(
    model: nn.Module, spec: ExportSpec, progress: Progress = lambda _step: None
) -> ExportReport:
    """Write and check one repository entry for ``model``; see the module docstring.

    Args:
        model: the classifier, in eval mode, mapping ``[N, *input_shape]`` to ``[N, K]``.
        spec: what to write and where.
        progress: called with a short description as each step starts.

    Raises:
        ExportError: the model does not fit the spec, its head cannot be converted, or a
            numerical check fails; the message says which.
    """
    started = time.perf_counter()
    model = model.eval()
    classes = _classes(model, spec)
    labels = spec.labels or tuple(str(i) for i in range(classes))
    if len(labels) != classes:
        raise ExportError(
            f"the labels file has {len(labels)} labels; the model has {classes} classes"
        )
    model_dir = spec.repository / spec.name
    folder = model_dir / str(spec.version or next_version(model_dir))
    if spec.precision.name == "fp32":
        report = _export_fp32(model, spec, folder, labels, progress)
    else:
        preprocess = spec.preprocess or Preprocess.default_for(spec.input_shape[0])
        # Read before the fp32 export, so a bad calibration folder fails at once.
        samples = spec.precision.inputs(preprocess, spec.input_shape)
        with tempfile.TemporaryDirectory() as scratch:
            report = _export_fp32(model, spec, Path(scratch), labels, progress)
            report.precision = derive(Path(scratch), folder, spec.precision, samples, progress)
        report.model_path = folder / MODEL_FILE
        report.dense_path = folder / DENSE_FILE if report.dense_path else None
    report.seconds = time.perf_counter() - started
    return report


def _export_fp32(
    model: nn.Module, spec: ExportSpec, folder: Path, labels: Sequence[str], progress: Progress
) -> ExportReport:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create '{folder}': {exc.strerror}") from exc
    rng = np.random.default_rng(0)
    progress("writing model.onnx")
    report = ExportReport(
        model_path=folder / MODEL_FILE,
        dense_path=None,
        classes=len(labels),
        parity_max_abs_diff=0.0,
    )
    report.protos.append(
        write_onnx(model, torch.zeros(1, *spec.input_shape), report.model_path, {0: "batch"})
    )
    progress("checking ONNX Runtime against PyTorch")
    inputs = [rng.standard_normal((n, *spec.input_shape)).astype(np.float32) for n in (1, 3)]
    report.parity_max_abs_diff = max_abs_diff(model, report.model_path, inputs)
    if report.parity_max_abs_diff > spec.parity_tolerance:
        raise ExportError(
            f"model.onnx differs from PyTorch by {report.parity_max_abs_diff:.3g} "
            f"(tolerance {spec.parity_tolerance:g})"
        )
    analysed = geometry.analyse(report.protos[0], (1, *spec.input_shape))
    report.uneven = [layer.describe() for layer in analysed.uneven]
    if spec.dense:
        report.dense_path = folder / DENSE_FILE
        _write_dense(model, spec, report.dense_path, report, rng, progress)
    progress("writing metadata")
    entries = _metadata(spec, report, labels)
    paths = [report.model_path] + ([report.dense_path] if report.dense_path else [])
    for proto, path in zip(report.protos, paths, strict=True):
        write_metadata(proto, path, entries)
    report.protos.clear()
    return report
