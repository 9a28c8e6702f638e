"""``convserve bench --protocol``: REST steps and the side-by-side comparison run end to end.

Structure only, never speed: which steps ran, that real servers answered them, that a refused
REST request counts as an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service import BUNDLED_REPOSITORY
from service.tools.bench.http import REST_BINARY, REST_JSON, infer_path, rest_target
from service.tools.bench.steps import Step
from service.tools.bench.sweep import served_benchmark
from service.tools.server_process import ServerProcess

LEVELS = (1, 4)  # what --smoke sweeps


def bench(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "service", "bench", "--smoke", "--apis", "kserve"),
            *("--cpu-threads", "1", "--output", str(tmp_path), *flags),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((tmp_path / "bench.json").read_text()), result.stdout


def steps(rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(r["api"], r["concurrency"]) for r in rows}


def test_both_protocols_side_by_side(tmp_path: Path) -> None:
    results, printed = bench(tmp_path, "--protocol", "both")
    assert results["protocol"] == "both"
    assert steps(results["served"]) == {("kserve", level) for level in LEVELS}  # gRPC sweep
    rows = results["protocols"]
    assert steps(rows) == {
        (api, level) for api in ("kserve", REST_JSON, REST_BINARY) for level in LEVELS
    }
    for row in rows:
        assert row["errors"] == 0 and row["requests_per_second"] > 0, row
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["server_cpu_ms_per_request"] > 0, row
        if row["api"] != "kserve":  # HTTP/1.1 carries one request at a time per connection
            assert row["connections"] == row["concurrency"]
    lines = [line for line in results["ratios"] if line.startswith("protocols at c=")]
    assert len(lines) == len(LEVELS)
    assert all("REST-binary/gRPC throughput" in line for line in lines)
    assert "protocols at c=4: gRPC" in printed


def test_the_sweep_over_rest_from_the_python_generator(tmp_path: Path) -> None:
    results, _ = bench(tmp_path, "--protocol", "http", "--generator", "python")
    served = results["served"]
    assert steps(served) == {(api, level) for api in (REST_JSON, REST_BINARY) for level in LEVELS}
    for row in served:
        assert row["generator"] == "python" and row["errors"] == 0, row
        assert row["requests_per_second"] > 0 and row["mean_batch"] >= 1, row
    assert results["protocols"] == []


def test_a_refused_rest_request_is_an_error() -> None:
    generators = ["python"]
    if shutil.which("h2load"):
        generators.append("h2load")
    elif os.environ.get("CI"):  # as in test_bench: CI must run it
        pytest.fail("h2load is not installed; .ci/run installs Debian's nghttp2-client")
    # 8x9 values: the model takes 8x8, so the server answers 400.
    tensor = {"name": "input", "shape": [1, 1, 8, 9], "datatype": "FP32", "data": [0.0] * 72}
    body = json.dumps({"inputs": [tensor]}).encode()
    with ServerProcess(BUNDLED_REPOSITORY) as server:
        target = rest_target(server, "digits")
        for generator in generators:
            step = Step(REST_JSON, infer_path("digits"), body, 2, 0.5, 1, generator)
            row = served_benchmark(target, step)
            assert row.errors > 0 and row.requests_per_second == 0, (generator, row)
