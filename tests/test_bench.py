"""The benchmark's smoke mode runs end to end, so it cannot rot (it asserts no speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "bench",
            "--smoke",
            "--dense",
            "--compare-batching",
            "--batching-window",
            "2000",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in results["raw"]] == [1, 8]
    assert [r["batch"] for r in results["raw_after"]] == [1, 8]  # the limit again, after the load
    assert all(r["threads"] >= 1 for r in results["raw"])
    assert {(r["api"], r["concurrency"]) for r in results["served"]} == {
        ("kserve", 1),
        ("kserve", 4),
        ("classify", 1),
        ("classify", 4),
    }
    assert all(r["errors"] == 0 and r["requests_per_second"] > 0 for r in results["served"])
    # The server the bench started is on this machine: its CPU per request is known.
    assert all(r["server_cpu_ms_per_request"] > 0 for r in results["served"])
    assert all("server CPU per request" in line for line in results["ratios"][-2:])
    assert any("served/raw-best throughput" in line for line in results["ratios"])
    assert results["dense"][0]["cells"] > 0
    # Batching as configured, off, and with a window (also at c=1), in alternating rounds.
    assert {(r["api"], r["concurrency"]) for r in results["batching"]} == {
        ("kserve", 4),
        ("kserve-nobatch", 4),
        ("kserve-window", 1),
        ("kserve-window", 4),
    }
    assert all(r["errors"] == 0 for r in results["batching"])
    assert any(line.startswith("batching with a 2000 us window/off") for line in results["ratios"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "served kserve" in result.stdout
