"""The prepared GPU check (docs/gpu.md): run once on a borrowed GPU machine.

    python scripts/gpu_check.py REPOSITORY MODEL OUT_DIR [--fp16-model NAME] [--work-dir DIR]
    python scripts/gpu_check.py REPOSITORY MODEL OUT_DIR --dry-run   # the plan, nothing run

1. the gpu-marked tests (CUDA really runs; GPU equals CPU; the server on CUDA; GPU gauges);
2. ``convserve bench`` on CUDA for MODEL: raw ONNX Runtime vs served at concurrency 1/16/64,
   and dense vs crops, as ratios measured side by side in one run;
3. the raw CPU figures of the same model on the same machine, for scale;
4. the fp16 row: ``convserve bench --compare-precision`` on CUDA for ``--fp16-model``
   (ResNet-50 by default), fp32 against fp16: raw ONNX Runtime CUDA at batch 1 and 8, served
   images/s and p99 at 16 clients, one short run. The entries are taken from ``--work-dir``
   (default OUT_DIR/precision-models), exported there first where missing (torch on the machine,
   random weights: timing only).

Without an NVIDIA driver or ``nvidia-smi`` the check says so and exits 0, having run nothing:
there is nothing here for it to check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.runtime import nvidia_driver_present  # noqa: E402

# int8 is left out on CUDA: ONNX Runtime's CUDA provider has no int8 convolution kernels for a
# QDQ model, so without TensorRT it runs the convolutions in fp32 between QuantizeLinear and
# DequantizeLinear nodes, which only adds work. fp16 runs on the tensor cores.
FP16_PRECISIONS = ("fp32", "fp16")
FP16_SECONDS = "3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The check's arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, metavar="REPOSITORY")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("out", type=Path, metavar="OUT_DIR")
    parser.add_argument(
        "--fp16-model",
        default="resnet50",
        metavar="NAME",
        help="the fp16 row's model: an entry of --work-dir, or torchvision.models:NAME",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the fp16 row's entries are kept (default OUT_DIR/precision-models)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands as JSON and run nothing"
    )
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each part's command, by name, in the order they run."""
    # The parts run in the repository root: paths are resolved where the check was started.
    out = args.out.resolve()
    bench = [sys.executable, "-m", "service", "bench"]
    model = [*("--model-repository", str(args.repository.resolve()), "--model", args.model)]
    work = (args.work_dir or out / "precision-models").resolve()
    return {
        "tests": [
            *(sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider"),
            "tests/test_gpu.py",
        ],
        "bench-cuda": [
            *bench,
            *model,
            *("--apis", "kserve", "--device", "cuda", "--dense"),
            *("--concurrency", "1", "16", "64", "--batch-sizes", "1", "8", "32"),
            *("--duration", "5", "--output", str(out / "bench-cuda")),
        ],
        "bench-cpu": [
            *bench,
            *model,
            *("--apis", "kserve", "--device", "cpu", "--raw", "--batch-sizes", "1", "8"),
            *("--duration", "3", "--output", str(out / "bench-cpu")),
        ],
        "fp16": [
            *bench,
            *("--compare-precision", "--precision-models", args.fp16_model),
            *("--precisions", *FP16_PRECISIONS, "--device", "cuda"),
            *("--work-dir", str(work), "--duration", FP16_SECONDS),
            *("--output", str(out / "bench-precision")),
        ],
    }


def fp16_row(results: dict[str, Any]) -> list[str]:
    """The fp16 row from ``precision.json``: each precision served against raw, and fp16/fp32."""
    lines = []
    for row in results["rows"]:
        against = (
            f", {row['over_fp32_b1']:.2f}x / {row['over_fp32_b8']:.2f}x fp32 at batch 1 / 8"
            if row["over_fp32_b8"] is not None
            else ""
        )
        lines.append(
            f"{row['model']} {row['precision']} on {row['provider']}: raw {row['raw_b1']:.1f} / "
            f"{row['raw_b8']:.1f} images/s at batch 1 / 8; served {row['served_c16']:.1f} "
            f"images/s at 16 clients, p99 {row['served_p99_ms']:.1f} ms, "
            f"{row['served_over_raw_best']:.2f}x its raw best{against}"
        )
    return lines


def cuda_missing() -> str | None:
    """Why this machine has nothing for the check, or None."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not installed"
    if not nvidia_driver_present():
        return "no NVIDIA driver is loaded"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the four parts; the exit code is the tests'."""
    args = parse_args(argv)
    commands = plan(args)
    if args.dry_run:
        print(json.dumps(commands))
        return 0
    if reason := cuda_missing():
        print(f"gpu_check: no CUDA device here ({reason}): nothing to check", flush=True)
        return 0
    card = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"card: {card}", flush=True)
    tests = subprocess.run(commands["tests"], cwd=ROOT, check=False)
    for part in ("bench-cuda", "bench-cpu", "fp16"):
        subprocess.run(commands[part], cwd=ROOT, check=False)
    results = args.out / "bench-precision" / "precision.json"
    if results.is_file():
        print("fp16 row:\n  " + "\n  ".join(fp16_row(json.loads(results.read_text()))))
    else:
        print(f"fp16 row: no results ({results} is missing; see the bench's output above)")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
