"""The benchmark's smoke mode runs end to end, so it cannot rot (it asserts no speed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.apart import run_apart


def test_bench_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "bench",
            "--smoke",
            "--apis",
            "kserve",
            "classify",
            "stream",
            "--dense",
            "--compare-batching",
            "--batching-window",
            "2000",
            "--floor",
            "--cpu-threads",
            "1",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # a sweep takes minutes: each step says so as it starts
    assert "convserve bench: step 1/" in result.stderr, result.stderr
    assert "convserve bench: the limit again, after the load" in result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in results["raw"]] == [1, 8]
    assert [r["batch"] for r in results["raw_after"]] == [1, 8]  # the limit again, after the load
    # The limit runs with the server's threads, before and after the load.
    assert results["server_threads"] == 1
    assert {r["threads"] for r in results["raw"] + results["raw_after"]} == {1}
    assert {(r["api"], r["concurrency"]) for r in results["served"]} == {
        ("kserve", 1),
        ("kserve", 4),
        ("classify", 1),
        ("classify", 4),
        ("stream", 1),
        ("stream", 4),
    }
    assert all(r["errors"] == 0 and r["requests_per_second"] > 0 for r in results["served"])
    # Streamed answers come in completion order, matched by id: only the Python generator can.
    assert {r["generator"] for r in results["served"] if r["api"] == "stream"} == {"python"}
    # The server the bench started is on this machine: its CPU per request is known.
    assert all(r["server_cpu_ms_per_request"] > 0 for r in results["served"])
    assert any(line.startswith("batching on/off at c=4") for line in results["ratios"])
    # Each step's ratios stand on the limit measured just before and just after it.
    steps = [(r["api"], r["concurrency"]) for r in results["served"]]
    beside = [(r["api"], r["concurrency"]) for r in results["raw_beside"]]
    best = max(results["raw"], key=lambda r: r["images_per_second"])["batch"]
    assert beside == [step for step in steps for _ in sorted({1, best})]
    assert {r["batch"] for r in results["raw_beside"]} == {1, best}
    throughput = [line for line in results["ratios"] if "served/raw-best throughput" in line]
    assert len(throughput) == len(steps) and all("beside it" in line for line in throughput)
    latency = [line for line in results["ratios"] if "p50 at c=1 minus raw batch-1" in line]
    assert len(latency) == 3  # kserve, classify and stream
    assert results["dense"][0]["cells"] > 0
    # Batching as configured, off, and with a window (also at c=1), in alternating rounds.
    assert {(r["api"], r["concurrency"]) for r in results["batching"]} == {
        ("kserve", 1),
        ("kserve", 4),
        ("kserve-nobatch", 4),
        ("kserve-window", 1),
        ("kserve-window", 4),
    }
    assert all(r["errors"] == 0 for r in results["batching"])
    assert any(line.startswith("batching with a 2000 us window/off") for line in results["ratios"])
    # The gRPC floor at c=1 and the highest level, alternating with the server.
    assert {(r["api"], r["concurrency"]) for r in results["floor"]} == {
        ("kserve", 1),
        ("kserve", 4),
        ("kserve-floor", 1),
        ("kserve-floor", 4),
    }
    assert all(r["errors"] == 0 and r["server_cpu_ms_per_request"] > 0 for r in results["floor"])
    assert any(line.startswith("convserve/gRPC floor at c=4") for line in results["ratios"])
    assert any(line.startswith("p50 at c=1: convserve") for line in results["ratios"])
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "served kserve" in result.stdout


STEP = """
import json, sys
from dataclasses import asdict

import numpy as np

from service import BUNDLED_REPOSITORY
from service._generated.inference import grpc_service_pb2 as pb
from service.tools.bench.sweep import (
    KSERVE_METHOD, STREAM_METHOD, Step, Target, served_benchmark,
)
from service.tools.server_process import ServerProcess


def payload(shape):
    request = pb.ModelInferRequest()
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, np.float32).tobytes())
    return request.SerializeToString()


rows = []
module = ("service", "serve") if sys.argv[2] == "serve" else ("service.tools.grpc_floor",)
# "stream": ModelStreamInfer, asked of h2load, which the bench replaces with service.tools.loadgen
method = STREAM_METHOD if sys.argv[1] == "stream" else KSERVE_METHOD
generator = "python" if sys.argv[1] == "python" else "h2load"
with ServerProcess(BUNDLED_REPOSITORY, module=module) as server:
    # 8x9 decodes (the bytes match the shape) but the model refuses it: INVALID_ARGUMENT.
    for shape in ([1, 1, 8, 8], [1, 1, 8, 9]):
        target = Target(server.grpc_address, server.metrics_url, "digits", server.process.pid)
        step = Step("kserve", method, payload(shape), 4, 1.0, 1, generator)
        row = served_benchmark(target, step)
        rows.append(asdict(row))
print(json.dumps(rows))
"""


@pytest.mark.parametrize(
    ("generator", "server"),
    [("python", "serve"), ("h2load", "serve"), ("h2load", "floor"), ("stream", "serve")],
)
def test_a_load_step_reports_what_the_server_did(generator: str, server: str) -> None:
    if generator == "h2load" and shutil.which("h2load") is None:
        if os.environ.get("CI"):  # as with promtool: CI must run it
            pytest.fail("h2load is not installed; .ci/run installs Debian's nghttp2-client")
        pytest.skip("h2load is not installed (Debian/Ubuntu: nghttp2-client)")
    good, bad = run_apart(STEP, generator, server)
    assert good["errors"] == 0 and good["requests_per_second"] > 0
    assert 0 < good["p50_ms"] <= good["p90_ms"] <= good["p99_ms"]
    assert good["server_cpu_ms_per_request"] > 0
    # The floor has no batches to report.
    assert good["mean_batch"] >= 1 if server == "serve" else math.isnan(good["mean_batch"])
    assert 0 < good["generator_cpu_share"] < 2
    assert good["generator"] == ("python" if generator in ("python", "stream") else "h2load")
    # Refused requests are errors, though h2load itself only sees HTTP 200 (gRPC statuses travel
    # in trailers): the server's own failure count says so.
    assert bad["errors"] > 0


@pytest.mark.parametrize("comparison", ["--floor", "--compare-batching"])
def test_comparisons_refuse_a_server_started_elsewhere(comparison: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "bench", "--server", "127.0.0.1:1", comparison],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "leave out --server" in result.stderr


SERVER_GONE = """
import json, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

from service import BUNDLED_REPOSITORY
from service._generated.inference import grpc_service_pb2 as pb
from service.tools.bench.steps import KSERVE_METHOD, STREAM_METHOD
from service.tools.server_process import ServerProcess

request = pb.ModelInferRequest(model_name="digits")
request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
request.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
stream = sys.argv[1] == "stream"
with tempfile.TemporaryDirectory() as folder, ServerProcess(BUNDLED_REPOSITORY) as server:
    payload = Path(folder, "request")
    payload.write_bytes(request.SerializeToString())
    load = subprocess.Popen(
        [sys.executable, "-m", "service.tools.loadgen", "--address", server.grpc_address,
         "--method", STREAM_METHOD if stream else KSERVE_METHOD, "--payload", str(payload),
         "--concurrency", "4", "--duration", "3", "--warmup", "0.2"]
        + (["--stream"] if stream else []),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.5)  # a second into the measured phase
    server.process.kill()
    out, err = load.communicate(timeout=60)
print(json.dumps({"code": load.returncode, "stderr": err, "summary": json.loads(out)}))
"""


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_the_load_generator_counts_a_server_gone_mid_step_as_errors(mode: str) -> None:
    """Killed in the middle of a step, the server's unanswered requests become errors.

    The load generator ends with its summary, instead of a traceback or a hang (a stream's
    messages in flight fail with it; unary calls keep failing until the step ends).
    """
    outcome = run_apart(SERVER_GONE, mode)
    assert outcome["code"] == 0 and "Traceback" not in outcome["stderr"], outcome["stderr"]
    summary = outcome["summary"]
    assert summary["requests"] > 0  # answered before the kill
    assert summary["errors"] and set(summary["errors"]) <= {"UNAVAILABLE", "CANCELLED"}
    if mode == "stream":  # one stream, its 4 messages in flight lost with it
        assert sum(summary["errors"].values()) == 4
