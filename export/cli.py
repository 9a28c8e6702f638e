"""The ``export``, ``inspect`` and ``demo`` subcommands of ``convserve``.

Only argument parsing and printing live here; torch is imported when a command runs, so the
server's command line stays light where torch is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ExportError
from .summaries import (
    RANDOM_WARNING,
    dense_agreement,
    precision_cost,
    precision_kind,
    uneven_summary,
)

if TYPE_CHECKING:
    from .model_entry import ExportReport
    from .precision import PrecisionReport, PrecisionSpec

__all__ = ["add_commands"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace(",", " ").split())


def add_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    bundled_repository: Path,
) -> None:
    """Register ``export``, ``inspect`` and ``demo`` on the ``convserve`` parser."""
    export = commands.add_parser(
        "export",
        help="turn a PyTorch classifier into a model-repository entry",
        description="Export SOURCE (package.module:callable) to DIR/NAME/VERSION/model.onnx and "
        "model.dense.onnx, checked against PyTorch and crop-by-crop evaluation.",
    )
    export.add_argument("source", metavar="SOURCE")
    export.add_argument("--input-shape", required=True, help="CxHxW or CxL, e.g. 3x224x224")
    export.add_argument("--name", required=True)
    export.add_argument("--model-repository", type=Path, required=True, metavar="DIR")
    export.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="state dict or whole saved module; default: the callable's own initialisation",
    )
    export.add_argument("--version", type=int, help="default: one above the highest present")
    export.add_argument("--labels", type=Path, metavar="FILE", help="one label per line")
    export.add_argument("--color", choices=["RGB", "L"])
    export.add_argument("--scale", type=float, default=1 / 255)
    export.add_argument("--mean", type=float, nargs="+")
    export.add_argument("--std", type=float, nargs="+")
    export.add_argument("--no-dense", action="store_true", help="skip model.dense.onnx")
    export.add_argument(
        "--parity-tolerance",
        type=float,
        default=1e-3,
        help="largest ONNX Runtime vs PyTorch difference accepted",
    )
    export.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="what both files are stored and computed in (default fp32); fp16 and int8 keep "
        "fp32 inputs and outputs",
    )
    export.add_argument(
        "--calibration",
        metavar="DIR|random",
        help="images to calibrate int8 on (one in five held out to measure the cost against "
        "fp32), or 'random': fit for timing, not for accuracy",
    )
    export.add_argument(
        "--calibration-samples",
        type=int,
        default=128,
        metavar="N",
        help="calibration inputs at most (default 128)",
    )
    export.add_argument(
        "--min-top1-agreement",
        type=float,
        default=0.99,
        metavar="F",
        help="fail when fp16 or int8 agrees with fp32 on fewer held-out inputs (default 0.99)",
    )
    export.set_defaults(handler=_export)

    inspect = commands.add_parser(
        "inspect", help="per-layer shapes, parameters and activation memory of an ONNX model"
    )
    inspect.add_argument("model", type=Path, metavar="MODEL.onnx")
    inspect.add_argument("--input-shape", help="CxHxW or CxL; default: the model's window")
    inspect.add_argument("--batch-sizes", type=int, nargs="+")
    inspect.set_defaults(handler=_inspect)

    demo = commands.add_parser("demo", help="re-create the bundled digits demo model")
    demo.add_argument(
        "--model-repository",
        type=Path,
        default=bundled_repository,
        metavar="DIR",
        help="default: the bundled repository, in place",
    )
    demo.add_argument(
        "--calibration-samples",
        type=int,
        default=256,
        metavar="N",
        help="training digits digits_int8 is calibrated on (default 256)",
    )
    demo.set_defaults(handler=_demo)


@contextmanager
def _steps(total: int) -> Iterator[Callable[[str], None]]:
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="step",
        file=sys.stderr,
        leave=False,
        bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}]",
    ) as bar:
        started = False

        def step(description: str) -> None:
            nonlocal started
            if started:
                bar.update()
            started = True
            bar.set_description(description)

        yield step
        bar.update(total - bar.n)


def _read_labels(path: Path | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ExportError(f"cannot read labels file '{path}': {exc.strerror}") from exc
    labels = tuple(line.strip() for line in lines if line.strip())
    if not labels:
        raise ExportError(f"labels file '{path}' has no labels")
    return labels


def _print_report(report: ExportReport) -> None:
    print(f"wrote {report.model_path} ({report.classes} classes)")
    print(f"  parity, ONNX Runtime vs PyTorch: max abs diff {report.parity_max_abs_diff:.3g}")
    if report.uneven:
        print(f"  {uneven_summary(len(report.uneven), str(report.model_path))}")
    if report.dense_path is None or report.geometry is None or report.check is None:
        _print_precision(report.precision)
        print(f"done in {report.seconds:.1f} s")
        return
    g, c = report.geometry, report.check
    print(f"wrote {report.dense_path}")
    for line in report.converted:
        print(f"  converted {line}")
    for line in report.global_pools:
        print(f"  kept whole-input pooling {line}: the map is approximate")
    print(
        f"  parity, dense ONNX vs its PyTorch module: max abs diff "
        f"{report.dense_parity_max_abs_diff:.3g}"
    )
    print(
        f"  geometry: stride {list(g.stride)}, window {list(g.window)}, offset "
        f"{list(g.offset)}, receptive field {g.receptive_field and list(g.receptive_field)}"
    )
    print(
        f"  dense vs crop-by-crop over {c.cells} cells at {[list(s) for s in c.sizes]} "
        f"(largest score {c.max_abs_score:.3g}): "
        + dense_agreement(g.exact, c.max_abs_dev, c.top1_agreement)
    )
    _print_precision(report.precision)
    print(f"done in {report.seconds:.1f} s")


def _print_precision(reduced: PrecisionReport | None) -> None:
    if reduced is None:
        return
    record = reduced.record
    print(f"  precision: {precision_kind(record)}")
    print(f"  {record.name} {precision_cost(record)}")
    shared, calibrated = reduced.shared_ranges
    if calibrated:
        print(
            f"  the dense twin takes the classifier's ranges for {shared} of its {calibrated} "
            "calibrated tensors"
        )
    if reduced.check is not None:
        step = f" (output step {record.output_step:.3g})" if record.output_step else ""
        print(
            f"  {record.name} dense vs {record.name} crop-by-crop over {reduced.check.cells} "
            f"cells: max abs deviation {reduced.check.max_abs_dev:.3g}{step}, top-1 agreement "
            f"{reduced.check.top1_agreement:.1%}"
        )


def _precision_spec(args: argparse.Namespace) -> PrecisionSpec:
    from .precision import PrecisionSpec

    random = args.calibration == "random"
    if random and args.precision == "int8":
        print(RANDOM_WARNING, file=sys.stderr)
    return PrecisionSpec(
        name=args.precision,
        calibration=Path(args.calibration) if args.calibration and not random else None,
        random=random or (args.precision == "fp16" and not args.calibration),
        samples=args.calibration_samples,
        min_top1_agreement=args.min_top1_agreement,
    )


def _export(args: argparse.Namespace) -> None:
    from model_format import Preprocess

    from .model_entry import ExportSpec, export_entry, parse_input_shape
    from .source import load_model, sha256_of

    shape = parse_input_shape(args.input_shape)
    channels = shape[0]
    preprocess = Preprocess.default_for(channels)
    preprocess = Preprocess(
        args.color or preprocess.color,
        args.scale,
        tuple(args.mean) if args.mean else preprocess.mean,
        tuple(args.std) if args.std else preprocess.std,
    )
    spec = ExportSpec(
        source=args.source,
        input_shape=shape,
        name=args.name,
        repository=args.model_repository,
        version=args.version,
        labels=_read_labels(args.labels),
        preprocess=preprocess,
        dense=not args.no_dense,
        parity_tolerance=args.parity_tolerance,
        weights_sha256=sha256_of(args.weights) if args.weights and args.weights.is_file() else None,
        precision=_precision_spec(args),
    )
    reduced = 0 if spec.precision.name == "fp32" else 2 + spec.dense
    with _steps(total=(7 if spec.dense else 4) + reduced) as step:
        step(f"loading {args.source}")
        model = load_model(args.source, args.weights)
        report = export_entry(model, spec, step)
    _print_report(report)


def _inspect(args: argparse.Namespace) -> None:
    from .inspection import BATCH_SIZES, inspect_file, render
    from .model_entry import parse_input_shape

    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    found, metadata = inspect_file(args.model, shape)
    print(render(found, metadata, args.batch_sizes or BATCH_SIZES))


def _demo(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from model_format import MODEL_FILE

    from .demo import EPOCHS, INT8_NAME, held_out_accuracy, make_demo

    with tqdm(
        total=EPOCHS, desc="training digits", unit="epoch", file=sys.stderr, leave=False
    ) as bar:

        def on_epoch(_epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()

        with _steps(total=9) as step:
            trained, report, int8 = make_demo(
                args.model_repository, on_epoch, step, args.calibration_samples
            )
    print(f"digits: held-out accuracy {trained.accuracy:.2%} (scikit-learn digits, 20% split)")
    _print_report(report)
    folder = args.model_repository / INT8_NAME / "1"
    print(f"{INT8_NAME}: held-out accuracy {held_out_accuracy(folder / MODEL_FILE):.2%}")
    print(f"wrote {folder}")
    _print_precision(int8)
