"""``convserve bench --compare-precision``: fp32 against int8 (and fp16), raw and served, one run.

For each model of ``--precision-models``, each precision's entry of ``--work-dir`` (``NAME`` for
fp32, ``NAME_int8``, ``NAME_fp16``) is measured three ways: in-process at batch 1 and 8 (the
bench's limit), served at 16 clients by a server this bench starts with that entry alone loaded,
and its dense twin in-process on one 384x384 image. The precisions of one model take turns in
every measurement, the raw rounds once before the served steps and once after in reverse
order, averaged: a machine that drifts moves both sides of a ratio alike.

An entry missing from ``--work-dir`` is exported there first by ``convserve export`` in a
subprocess (tools never import ``export/``), from ``torchvision.models:NAME`` with its own
random weights and int8 ranges calibrated on random inputs: fit for timing, not for accuracy.
A rerun finds the files and exports nothing. The table, the CPU and its VNNI instructions, and
the targets are printed (:mod:`.precision_report`) and written to ``precision.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model_format import DENSE_FILE, MODEL_FILE
from service.engine.runtime import DeviceChoice, Runtime
from service.tools.bench.payloads import kserve_payload
from service.tools.bench.precision_report import (
    PrecisionRow,
    read_cpu,
    report_lines,
    with_ratios,
)
from service.tools.bench.raw import RawLimit, averaged
from service.tools.bench.servers import target_of
from service.tools.bench.steps import KSERVE_METHOD, ServedRow, Step
from service.tools.bench.sweep import served_benchmark
from service.tools.server_process import ServerProcess

__all__ = [
    "CLIENTS",
    "DENSE_SIZE",
    "compare_precision",
    "dense_ms_per_image",
    "entry_name",
    "export_command",
]

CLIENTS = 16
"""Clients in flight for the served figure."""
DENSE_SIZE = 384
"""Side of the square image the dense twin is timed on."""
BATCHES = [1, 8]
INPUT_SHAPE = "3x224x224"
# torchvision's ImageNet normalisation, so the exported entries also answer Classify as the
# torchvision models expect.
IMAGENET_MEAN = ("0.485", "0.456", "0.406")
IMAGENET_STD = ("0.229", "0.224", "0.225")
# Calibration inputs for int8: the ranges only need to exist for timing, and fewer inputs
# keep the one-time export short.
CALIBRATION_SAMPLES = 32
EXPORT_TIMEOUT_S = 3600
_PROGRESS_BAR = re.compile(r"\d+/\d+ \[")


class PrecisionError(Exception):
    """An entry could not be exported or measured; the message says which and why."""


@dataclass(frozen=True)
class _Setup:
    """What every entry's measurement shares.

    Attributes:
        args: the ``bench`` command's arguments.
        seconds: length of each raw batch size's run and of the served step.
        generator: the load generator (``auto`` resolved).
        connections: TCP connections the served load is spread over.
    """

    args: argparse.Namespace
    seconds: float
    generator: str
    connections: int


def entry_name(model: str, precision: str) -> str:
    """The repository entry of ``model`` in ``precision``: the name itself for fp32."""
    return model if precision == "fp32" else f"{model}_{precision}"


def export_command(model: str, precision: str, work: Path) -> list[str]:
    """The ``convserve export`` call that writes ``model``'s ``precision`` entry into ``work``."""
    command = [
        *(sys.executable, "-m", "service", "export", f"torchvision.models:{model}"),
        *("--input-shape", INPUT_SHAPE, "--name", entry_name(model, precision)),
        *("--model-repository", str(work), "--version", "1", "--color", "RGB"),
        *("--mean", *IMAGENET_MEAN, "--std", *IMAGENET_STD),
    ]
    if precision != "fp32":
        command += ["--precision", precision]
    if precision == "int8":
        command += ["--calibration", "random", "--calibration-samples", str(CALIBRATION_SAMPLES)]
    return command


def _progress(step: str) -> None:
    print(f"convserve bench: {step}", file=sys.stderr, flush=True)


def _ensure_entry(model: str, precision: str, work: Path) -> Path:
    """The entry's version folder, exported first when its model file is missing.

    Raises:
        PrecisionError: the export failed (its last lines of output in the message).
    """
    entry = entry_name(model, precision)
    folder = work / entry / "1"
    if (folder / MODEL_FILE).is_file():
        _progress(f"{entry}: found in {work}, not exported again")
        return folder
    if folder.exists():
        # A folder without its model file is what an interrupted export leaves behind.
        shutil.rmtree(folder)
    _progress(f"{entry}: exporting into {work} (once; a rerun reuses it)")
    try:
        result = subprocess.run(
            export_command(model, precision, work),
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PrecisionError(f"exporting {entry} took over {EXPORT_TIMEOUT_S} s") from exc
    if result.returncode != 0 or not (folder / MODEL_FILE).is_file():
        # The exporter's progress bars say nothing about why it failed: its other lines do.
        said = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.strip() and not _PROGRESS_BAR.search(line)
        ]
        tail = "\n".join(said[-8:])
        raise PrecisionError(f"exporting {entry} into {work} failed:\n{tail}")
    return folder


def dense_ms_per_image(
    paths: dict[str, Path], device: str, cpu_threads: int, seconds: float
) -> dict[str, float | None]:
    """Median ms of each dense twin on one ``DENSE_SIZE`` square image, the twins in turn.

    Keyed as ``paths`` (a precision each); None where a file is missing or the model is 1-D.
    The twins run as the server runs them (any input size, so no CPU arena), one pass of each in
    every round, so a drifting machine slows them alike; ``seconds`` each, 3 to 50 rounds.
    """
    runtimes: dict[str, Runtime] = {}
    feeds: dict[str, dict[str, np.ndarray]] = {}
    try:
        for key, path in paths.items():
            if not path.is_file():
                continue
            runtimes[key] = Runtime(path, DeviceChoice(device), 1, cpu_threads, dynamic_shapes=True)
            spec = runtimes[key].inputs[0]
            if len(spec.shape) == 4:  # a 1-D model's twin has no square image to run on
                shape = (1, spec.shape[1], DENSE_SIZE, DENSE_SIZE)
                image = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
                feeds[key] = {spec.name: image}
                runtimes[key].run(feeds[key])  # allocation and, on CUDA, the algorithm search
        times: dict[str, list[float]] = {key: [] for key in feeds}
        started, budget = time.perf_counter(), seconds * len(feeds)
        rounds = 0
        while rounds < 3 or (time.perf_counter() - started < budget and rounds < 50):
            for key, feed in feeds.items():
                begun = time.perf_counter()
                runtimes[key].run(feed)
                times[key].append(time.perf_counter() - begun)
            rounds += 1
    finally:
        for runtime in runtimes.values():
            runtime.close()
    return {key: statistics.median(times[key]) * 1000 if key in times else None for key in paths}


def _server_args(args: argparse.Namespace, entry: str) -> list[str]:
    """The flags of a server that loads ``entry`` alone, otherwise as the bench's own."""
    return [
        *("--device", args.device, "--workers", str(args.workers)),
        *("--event-loop", args.event_loop),
        *(["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []),
        *("--model-control-mode", "explicit", "--load-model", entry),
    ]


def _served(setup: _Setup, folder: Path, limit: RawLimit) -> ServedRow:
    """The entry in ``folder`` served alone, loaded by ``CLIENTS`` clients of one image each."""
    entry = folder.parent.name
    step = Step(
        "kserve",
        KSERVE_METHOD,
        kserve_payload(limit.runtime),
        CLIENTS,
        setup.seconds,
        setup.connections,
        setup.generator,
    )
    with ServerProcess(folder.parents[1], *_server_args(setup.args, entry)) as server:
        return served_benchmark(target_of(server, entry), step)


def _precisions(chosen: list[str] | None, on_cuda: bool) -> list[str]:
    """The precisions measured: fp32, then ``--precisions``, or int8 (and fp16 on CUDA)."""
    if chosen is None:
        chosen = ["int8", "fp16"] if on_cuda else ["int8"]
    return ["fp32", *(p for p in dict.fromkeys(chosen) if p != "fp32")]


def _model_rows(setup: _Setup, model: str) -> list[PrecisionRow]:
    """Every precision of ``model``: raw in turn, each served alone, raw in reverse turn.

    fp32 is loaded first: its provider tells whether fp16 belongs to the default. Averaging
    the two raw rounds, run in opposite orders, cancels a steady drift of the machine from
    the precisions' ratios and brackets each served step.
    """
    args, work, seconds = setup.args, setup.args.work_dir, setup.seconds
    folders = {"fp32": _ensure_entry(model, "fp32", work)}
    limits: dict[str, RawLimit] = {}
    try:
        limits["fp32"] = RawLimit(
            folders["fp32"] / MODEL_FILE, args.device, BATCHES, args.cpu_threads
        )
        for precision in _precisions(args.precisions, limits["fp32"].runtime.on_cuda)[1:]:
            folders[precision] = _ensure_entry(model, precision, work)
            limits[precision] = RawLimit(
                folders[precision] / MODEL_FILE, args.device, BATCHES, args.cpu_threads
            )
        _progress(f"{model}: {', '.join(folders)} in-process at batch 1 and 8, in turn")
        first = {p: limit.measure(BATCHES, seconds) for p, limit in limits.items()}
        served = {}
        for precision, folder in folders.items():
            _progress(f"{folder.parent.name}: served at {CLIENTS} clients")
            served[precision] = _served(setup, folder, limits[precision])
        _progress(f"{model}: in-process again, in reverse turn")
        second = {p: limits[p].measure(BATCHES, seconds) for p in reversed(limits)}
        providers = {p: limit.runtime.provider for p, limit in limits.items()}
    finally:
        for limit in limits.values():
            limit.close()
    _progress(f"{model}: the dense twins at {DENSE_SIZE}x{DENSE_SIZE}, in turn")
    dense = dense_ms_per_image(
        {p: f / DENSE_FILE for p, f in folders.items()}, args.device, args.cpu_threads, seconds
    )
    rows = []
    for precision in folders:
        raw = {
            a.batch: averaged(a, b)
            for a, b in zip(first[precision], second[precision], strict=True)
        }
        rows.append(
            PrecisionRow(
                model=model,
                precision=precision,
                provider=providers[precision],
                raw_b1=raw[1].images_per_second,
                raw_b8=raw[8].images_per_second,
                served_c16=served[precision].requests_per_second,
                served_p99_ms=served[precision].p99_ms,
                served_errors=served[precision].errors,
                served_mean_batch=served[precision].mean_batch,
                served_cpu_ms=served[precision].server_cpu_ms_per_request,
                dense_ms_per_image=dense[precision],
            )
        )
    return rows


def _refusal(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot make a precision comparison, or None."""
    if args.server:
        return "--compare-precision starts a server for each entry it measures: leave out --server"
    if getattr(args, "protocol", "grpc") != "grpc":
        return "--compare-precision serves over gRPC alone: leave out --protocol"
    if args.raw or args.dense or args.floor or args.compare_batching:
        return (
            "--compare-precision measures raw, served and dense itself; leave out --raw, "
            "--dense, --floor and --compare-batching"
        )
    return None


def compare_precision(args: argparse.Namespace) -> int:
    """The ``bench --compare-precision`` command; 1 with a message where it cannot run."""
    if problem := _refusal(args):
        print(f"convserve bench: error: {problem}", file=sys.stderr)
        return 1
    generator = args.generator
    if generator == "auto":
        generator = "h2load" if shutil.which("h2load") else "python"
    connections = args.connections or (1 if args.workers == 1 else 8 * args.workers)
    setup = _Setup(args, 1.0 if args.smoke else args.duration, generator, connections)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[PrecisionRow] = []
    try:
        for model in args.precision_models:
            rows += _model_rows(setup, model)
    except PrecisionError as exc:
        print(f"convserve bench: error: {exc}", file=sys.stderr)
        return 1
    cpu = read_cpu()
    results = {
        "cpu": asdict(cpu) | {"vnni": cpu.vnni},
        "work_dir": str(args.work_dir),
        "seconds": setup.seconds,
        "clients": CLIENTS,
        "dense_size": DENSE_SIZE,
        "generator": generator,
        "rows": with_ratios(rows),
    }
    lines = report_lines(rows, cpu)
    results["report"] = lines
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "precision.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(f"results: {args.output / 'precision.json'}")
    return 0
