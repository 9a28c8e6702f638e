"""The prepared GPU check (docs/gpu.md): run once on a borrowed GPU machine.

    python scripts/gpu_check.py REPOSITORY MODEL OUT_DIR

1. the gpu-marked tests (CUDA really runs; GPU equals CPU; the server on CUDA; GPU gauges);
2. ``convserve bench`` on CUDA for MODEL: raw ONNX Runtime vs served at concurrency 1/16/64,
   and dense vs crops, as ratios measured side by side in one run;
3. the raw CPU figures of the same model on the same machine, for scale.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the three parts; the exit code is the tests'."""
    repository, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    card = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"card: {card}", flush=True)
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-v",
            "-p",
            "no:cacheprovider",
            "tests/test_gpu.py",
        ],
        cwd=ROOT,
        check=False,
    )
    bench = [
        sys.executable,
        "-m",
        "service",
        "bench",
        "--model-repository",
        repository,
        "--model",
        model,
        "--apis",
        "kserve",
    ]
    subprocess.run(
        [
            *bench,
            "--device",
            "cuda",
            "--dense",
            "--concurrency",
            "1",
            "16",
            "64",
            "--batch-sizes",
            "1",
            "8",
            "32",
            "--duration",
            "5",
            "--output",
            str(out / "bench-cuda"),
        ],
        cwd=ROOT,
        check=False,
    )
    subprocess.run(
        [
            *bench,
            "--device",
            "cpu",
            "--raw",
            "--batch-sizes",
            "1",
            "8",
            "--duration",
            "3",
            "--output",
            str(out / "bench-cpu"),
        ],
        cwd=ROOT,
        check=False,
    )
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
