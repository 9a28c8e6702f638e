"""``convserve bench --compare-precision`` end to end on the demo model; the GPU check's fp16 row.

The comparison runs through the real command line on a copy of the bundled repository (digits,
digits_int8, and a digits_fp16 derived here), so nothing is exported by torch: the tests check
the table's structure and that every ratio comes from the measured figures, never a speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

from export.precision import PrecisionSpec, derive
from model_format import MODEL_FILE, read_model_info
from scripts import gpu_check
from service import BUNDLED_REPOSITORY
from service.__main__ import build_parser
from service.tools.bench.precision import entry_name, export_command
from service.tools.bench.precision_report import (
    INT8_TARGET,
    SERVED_TARGET,
    CpuInfo,
    PrecisionRow,
    read_cpu,
    report_lines,
)

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "bench", "--compare-precision", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("precision")
    work = folder / "repository"
    shutil.copytree(BUNDLED_REPOSITORY, work)
    source = work / "digits" / "1"
    metadata = {p.key: p.value for p in onnx.load(str(source / MODEL_FILE)).metadata_props}
    preprocess = read_model_info(metadata).preprocess
    assert preprocess is not None
    spec = PrecisionSpec("fp16", random=True, samples=8)
    derive(source, work / "digits_fp16" / "1", spec, spec.inputs(preprocess, (1, 8, 8)))
    result = bench(
        *("--precision-models", "digits", "--precisions", "int8", "fp16"),
        *("--work-dir", str(work), "--duration", "0.5", "--cpu-threads", "1"),
        *("--output", str(folder / "out")),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((folder / "out" / "precision.json").read_text())
    return {"stdout": result.stdout, "stderr": result.stderr, "results": results, "work": work}


def test_every_entry_is_measured_raw_served_and_dense_and_nothing_exported(
    compared: dict[str, Any],
) -> None:
    rows = compared["results"]["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("digits", "fp32"),
        ("digits", "int8"),
        ("digits", "fp16"),
    ]
    for row in rows:
        assert row["provider"] == "CPUExecutionProvider"
        assert row["raw_b1"] > 0 and row["raw_b8"] > 0 and row["served_c16"] > 0
        assert row["served_errors"] == 0 and row["served_p99_ms"] > 0
        assert row["served_mean_batch"] >= 1 and row["served_cpu_ms"] > 0
        assert row["dense_ms_per_image"] > 0
        entry = entry_name(row["model"], row["precision"])
        assert f"{entry}: found in {compared['work']}, not exported again" in compared["stderr"]
    assert "exporting" not in compared["stderr"]
    assert compared["results"]["clients"] == 16 and compared["results"]["dense_size"] == 384


def test_the_ratios_come_from_the_measured_figures(compared: dict[str, Any]) -> None:
    rows = compared["results"]["rows"]
    fp32 = rows[0]
    assert fp32["over_fp32_b1"] is None and fp32["over_fp32_b8"] is None
    for row in rows:
        best = max(row["raw_b1"], row["raw_b8"])
        assert row["served_over_raw_best"] == pytest.approx(row["served_c16"] / best)
    for row in rows[1:]:
        assert row["over_fp32_b1"] == pytest.approx(row["raw_b1"] / fp32["raw_b1"])
        assert row["over_fp32_b8"] == pytest.approx(row["raw_b8"] / fp32["raw_b8"])


def test_the_printed_table_cpu_and_targets(compared: dict[str, Any]) -> None:
    lines = compared["stdout"].splitlines()
    cpu = read_cpu()
    assert lines[0] == f"cpu: {cpu.model}; VNNI: {cpu.vnni}"
    assert lines[1].startswith("flags: avx2 ") and "avx512_vnni" in lines[1] and "amx" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | precision"))
    assert "served/raw-best" in lines[header] and "dense 384 ms/img" in lines[header]
    columns = lines[header].count("|")
    for line, row in zip(lines[header + 2 : header + 5], compared["results"]["rows"], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert line.count("|") == columns
        assert cells[:2] == [row["model"], row["precision"]]
        assert cells[2] == f"{row['raw_b1']:.1f}" and cells[4] == f"{row['served_c16']:.1f}"
        assert cells[6] == f"{row['served_over_raw_best']:.2f}"
        expected = "-" if row["over_fp32_b8"] is None else f"{row['over_fp32_b8']:.2f}"
        assert cells[8] == expected
    int8 = compared["results"]["rows"][1]
    served = next(line for line in lines if line.startswith("digits int8 served/its raw best"))
    verdict = "PASS" if int8["served_over_raw_best"] >= SERVED_TARGET else "below"
    assert served.endswith(verdict)
    speedup = next(line for line in lines if line.startswith("digits int8/fp32 at batch 8"))
    if cpu.vnni == "none":
        assert speedup.endswith("(no VNNI on this CPU: ratio only)")
    else:
        assert speedup.endswith("PASS" if int8["over_fp32_b8"] >= INT8_TARGET else "below")
    assert compared["results"]["report"] == lines[: len(compared["results"]["report"])]


def row(precision: str, b8: float, provider: str = "CPUExecutionProvider") -> PrecisionRow:
    return PrecisionRow("net", precision, provider, b8 / 2, b8, b8 * 0.95, 5.0, 0, 1.0, 1.0, None)


@pytest.mark.parametrize(
    ("flags", "provider", "expected"),
    [
        ({"avx512_vnni": True}, "CPUExecutionProvider", "target >= 2.5x with AVX-512 VNNI: PASS"),
        ({"avx_vnni": True}, "CPUExecutionProvider", "target >= 2.5x with AVX-VNNI: PASS"),
        ({}, "CPUExecutionProvider", "(no VNNI on this CPU: ratio only)"),
        ({"avx512_vnni": True}, "CUDAExecutionProvider", "ratio only, the target is a CPU's)"),
    ],
)
def test_the_int8_target_holds_only_on_a_cpu_with_vnni(
    flags: dict[str, bool], provider: str, expected: str
) -> None:
    rows = [row("fp32", 100.0, provider), row("int8", 300.0, provider)]
    lines = report_lines(rows, CpuInfo("test cpu", flags))
    speedup = next(line for line in lines if line.startswith("net int8/fp32 at batch 8: "))
    assert speedup.startswith("net int8/fp32 at batch 8: 3.00x") and speedup.endswith(expected)
    assert lines[-1] == "net int8 served/its raw best: 0.95x, target >= 0.9x: PASS"
    slower = [row("fp32", 100.0, provider), row("int8", 200.0, provider)]
    slower_lines = report_lines(slower, CpuInfo("test cpu", flags))
    assert any(line.startswith("net int8/fp32 at batch 8: 2.00x") for line in slower_lines)
    if expected.endswith("PASS"):
        assert any(line.endswith(": below") and "2.00x" in line for line in slower_lines)
    else:
        assert not any("below" in line for line in slower_lines)


@pytest.mark.parametrize(
    ("flags", "vnni", "amx"),
    [
        ("fpu avx2 avx512f avx512_vnni avx512_bf16", "AVX-512 VNNI", False),
        ("fpu avx2 avx_vnni amx_tile amx_int8", "AVX-VNNI", True),
        ("fpu sse4_2 avx2", "none", False),
    ],
)
def test_read_cpu_names_the_model_and_the_vnni(
    tmp_path: Path, flags: str, vnni: str, amx: bool
) -> None:
    info = tmp_path / "cpuinfo"
    processor = f"processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: {flags}\n\n"
    info.write_text(processor + processor.replace("Some CPU 9000", "another"))
    cpu = read_cpu(info)
    assert cpu.model == "Some CPU 9000" and cpu.vnni == vnni
    assert cpu.flags["amx"] is amx and cpu.flags["avx2"] is True
    assert read_cpu(tmp_path / "missing").model == "unknown"


def test_the_export_commands_parse_as_the_exporter_expects(tmp_path: Path) -> None:
    parsed = build_parser().parse_args(export_command("resnet18", "int8", tmp_path)[3:])
    assert parsed.source == "torchvision.models:resnet18" and parsed.name == "resnet18_int8"
    assert parsed.precision == "int8" and parsed.calibration == "random"
    assert parsed.model_repository == tmp_path and parsed.version == 1
    fp32 = build_parser().parse_args(export_command("resnet18", "fp32", tmp_path)[3:])
    assert fp32.name == "resnet18" and fp32.precision == "fp32" and fp32.calibration is None


def test_a_model_that_cannot_be_exported_stops_the_bench_with_the_exporters_reason(
    tmp_path: Path,
) -> None:
    result = bench("--precision-models", "no_such_net", "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 1
    assert f"exporting no_such_net into {tmp_path / 'work'} failed" in result.stderr
    assert "has no attribute 'no_such_net'" in result.stderr
    assert not (tmp_path / "work" / "no_such_net" / "1" / MODEL_FILE).exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--server", "127.0.0.1:1"], "--compare-precision starts a server for each entry"),
        (["--floor"], "leave out --raw, --dense, --floor and --compare-batching"),
    ],
)
def test_the_comparison_refuses_what_it_does_itself(flags: list[str], message: str) -> None:
    result = bench(*flags)
    assert result.returncode == 1
    assert message in result.stderr


def test_gpu_check_without_cuda_says_so_and_runs_nothing(tmp_path: Path) -> None:
    if gpu_check.cuda_missing() is None:
        pytest.skip("this machine has a GPU: the check would run for real")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "repo", "digits", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "gpu_check: no CUDA device here (" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_fp16_row_is_the_precision_bench_on_cuda(
    tmp_path: Path, compared: dict[str, Any]
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "repo",
            "m",
            str(tmp_path),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    commands = json.loads(result.stdout)
    assert list(commands) == ["tests", "bench-cuda", "bench-cpu", "fp16"]
    fp16 = build_parser().parse_args(commands["fp16"][3:])
    assert fp16.compare_precision and fp16.precision_models == ["resnet50"]
    assert fp16.precisions == ["fp32", "fp16"] and fp16.device == "cuda"
    assert fp16.work_dir == tmp_path / "precision-models"
    assert fp16.output == tmp_path / "bench-precision"
    for part in ("bench-cuda", "bench-cpu"):
        assert build_parser().parse_args(commands[part][3:]).model == "m"
    # What it prints from the bench's results: one line per precision, from their figures.
    lines = gpu_check.fp16_row(compared["results"])
    assert len(lines) == 3
    for line, measured in zip(lines, compared["results"]["rows"], strict=True):
        assert line.startswith(f"digits {measured['precision']} on CPUExecutionProvider: ")
        assert f"p99 {measured['served_p99_ms']:.1f} ms" in line
        assert f"{measured['served_over_raw_best']:.2f}x its raw best" in line
    assert f"{compared['results']['rows'][2]['over_fp32_b8']:.2f}x fp32" in lines[2]
