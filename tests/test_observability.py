"""Metrics by scraping, alert rules and dashboard through promtool, and a real Prometheus."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.engine.metrics import GPU_METRICS, WORKER_METRICS
from service.tools.server_process import ServerProcess
from tests import onnx_models

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "convserve.json"


def require(tool: str) -> str:
    """The tool's path; in CI its absence fails the test, elsewhere it skips it."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; .ci/run installs Debian's prometheus package")
        pytest.skip(f"{tool} is not installed (Debian package prometheus)")
    return path


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    onnx_models.slow(root / "slow" / "1", depth=48, config={"max_batch_size": 4})
    with ServerProcess(root, "--log-format", "json") as process:
        yield process


def digits_input(rows: int, width: int = 8) -> triton.InferInput:
    tensor = triton.InferInput("input", [rows, 1, 8, width], "FP32")
    tensor.set_data_from_numpy(np.zeros((rows, 1, 8, width), np.float32))
    return tensor


def test_exact_metric_deltas(server: ServerProcess) -> None:
    before = scrape(server.metrics_url)
    with triton.InferenceServerClient(server.grpc_address) as client:
        for rows in (1, 2, 3):  # three sequential requests: three batches, six images
            client.infer("digits", [digits_input(rows)], request_id=f"ok-{rows}")
        with pytest.raises(InferenceServerException):
            client.infer("digits", [digits_input(1, width=9)], request_id="bad-shape")
        with pytest.raises(InferenceServerException):
            client.infer("nope", [digits_input(1)])
    # refused while decoding, before the model is looked up: still counted under digits
    from tritonclient.grpc import service_pb2 as triton_pb

    undecodable = triton_pb.ModelInferRequest(model_name="digits")
    undecodable.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    undecodable.raw_input_contents.append(b"\x00" * 12)  # 3 floats for 64
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=triton_pb.ModelInferRequest.SerializeToString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(undecodable, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with triton.InferenceServerClient(server.grpc_address) as client:
        slow = triton.InferInput("x", [1, 1024], "FP32")
        slow.set_data_from_numpy(np.zeros((1, 1024), np.float32))
        with pytest.raises(InferenceServerException) as expired:
            client.infer("slow", [slow], timeout=1)  # 1 µs: dropped before compute
        assert "DEADLINE_EXCEEDED" in str(expired.value.status())
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(buffer, format="PNG")
        stub.Classify(
            pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=buffer.getvalue())])
        )
        stub.ClassifyDense(
            pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=buffer.getvalue()))
        )  # (10-8)//2+1 x (12-8)//2+1 = 6 cells
    time.sleep(0.3)  # the expired request is dropped when the worker reaches it
    after = scrape(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def requests(model: str, version: str, api: str, code: str) -> float:
        labels = {"model": model, "version": version, "api": api, "code": code}
        return delta("convserve_requests_total", **labels, protocol="grpc")

    assert requests("digits", "1", "kserve", "OK") == 3
    # the bad shape, and the undecodable request
    assert requests("digits", "1", "kserve", "INVALID_ARGUMENT") == 2
    assert requests("_unknown", "", "kserve", "NOT_FOUND") == 1
    assert requests("slow", "1", "kserve", "DEADLINE_EXCEEDED") == 1
    assert requests("digits", "1", "classify", "OK") == 1
    assert requests("digits_dense", "1", "dense", "OK") == 1
    duration = "convserve_request_duration_seconds_count"
    assert delta(duration, model="digits", api="kserve", protocol="grpc") == 5
    assert delta(duration, model="_unknown", api="kserve", protocol="grpc") == 1
    assert delta("convserve_inferences_total", model="digits") == 7  # 1 + 2 + 3 + classify
    assert delta("convserve_batches_total", model="digits") == 4
    assert delta("convserve_batch_size_count", model="digits") == 4
    assert delta("convserve_batch_size_sum", model="digits") == 7
    assert delta("convserve_compute_duration_seconds_count", model="digits") == 4
    assert delta("convserve_queue_duration_seconds_count", model="digits") == 4
    assert delta("convserve_inferences_total", model="digits_dense") == 1
    assert delta("convserve_dense_cells_total", model="digits_dense") == 6
    assert delta("convserve_dropped_requests_total", model="slow", reason="deadline") == 1
    assert delta("convserve_batches_total", model="slow") == 0  # no compute for it
    # present and zero, not merely absent (value() reads a missing series as 0)
    assert ("convserve_inflight_requests", ()) in after
    assert ("convserve_queue_depth", (("model", "digits"),)) in after
    assert value(after, "convserve_inflight_requests") == 0
    assert value(after, "convserve_queue_depth", model="digits") == 0
    assert (
        value(
            after,
            "convserve_model_ready",
            model="digits",
            version="1",
            provider="CPUExecutionProvider",
        )
        == 1
    )
    assert not any(name in GPU_METRICS for name, _labels in after)  # absent, not zero
    assert any(name == "process_cpu_seconds_total" for name, _labels in after)

    failures = [
        json.loads(line) for line in server.lines if line.startswith("{") and '"status"' in line
    ]
    bad = next(f for f in failures if f.get("request_id") == "bad-shape")
    assert bad["model"] == "digits" and bad["status"] == "INVALID_ARGUMENT"
    assert bad["duration_seconds"] >= 0 and "raw" not in json.dumps(bad)


def test_promtool_accepts_the_exposition(server: ServerProcess) -> None:
    promtool = require("promtool")
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_alert_rules_check_and_unit_tests() -> None:
    promtool = require("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run(
            [promtool, *args],
            cwd=ALERTS.parent,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def dashboard_expressions(rate_interval: str = "1m") -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"model", "pod", "datasource"} <= variables
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return [
        e.replace("$__rate_interval", rate_interval).replace("$model", ".*").replace("$pod", ".*")
        for e in expressions
    ]


def metric_names(expression: str) -> set[str]:
    return {
        re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n
        for n in re.findall(r"\bconvserve_[a-z_]+", expression)
    }


def test_dashboard_queries_parse_and_name_exported_metrics(
    server: ServerProcess, tmp_path: Path
) -> None:
    promtool = require("promtool")
    expressions = dashboard_expressions()
    assert len(expressions) >= 13
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": e} for i, e in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    exported = {
        re.sub(r"_(bucket|sum|count|created)$", "", name)
        for name, _labels in scrape(server.metrics_url)
    } | set(GPU_METRICS + WORKER_METRICS)
    named = set().union(*(metric_names(e) for e in expressions), metric_names(ALERTS.read_text()))
    assert named and named <= exported, sorted(named - exported)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_real_prometheus_scrapes_and_answers_the_dashboard(
    server: ServerProcess, tmp_path: Path
) -> None:
    binary = require("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "convserve",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{server.metrics_port}"],
                                "labels": {"pod": "convserve-test"},
                            }
                        ],
                    }
                ],
            }
        )
    )
    started = time.monotonic()
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The dashboard's own queries over a short range, each of which this traffic must answer
    # (rates and quantiles above 0); GPU panels, drops, dense cells and errors need other load.
    keys = {
        expression: "rate(" in expression
        for expression in dashboard_expressions("10s")
        if not re.search(r"gpu_|dropped_|dense_cells|code!=", expression)
    }
    assert len(keys) >= 10
    answered: dict[str, list] = {}
    try:
        with triton.InferenceServerClient(server.grpc_address) as client:
            while time.monotonic() - started < 40 and len(answered) < len(keys):
                for _ in range(20):
                    client.infer("digits", [digits_input(2)])
                for expression, positive in keys.items():
                    if expression not in answered:
                        result = query(port, expression, positive)
                        if result:
                            answered[expression] = result
                time.sleep(0.5)
    finally:
        prometheus.terminate()
        prometheus.wait(30)
    assert set(answered) == set(keys), f"no answer for {set(keys) - set(answered)}"
    throughput = next(e for e in keys if "convserve_inferences_total" in e)
    assert any(r["metric"].get("model") == "digits" for r in answered[throughput])
    print(f"Prometheus end to end: {time.monotonic() - started:.1f} s")


def query(port: int, expression: str, positive: bool) -> list:
    """The instant vector's series; with ``positive``, only those with a value above 0."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return []  # not listening yet
    results = reply.get("data", {}).get("result", [])
    if positive:
        results = [r for r in results if r["value"][1] != "NaN" and float(r["value"][1]) > 0]
    return results


def test_failed_request_log_takes_the_request_id_from_metadata(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.Classify(
                pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"junk")]),
                metadata=[("x-request-id", "trace-42")],
            )
    records: list[dict] = []
    give_up = time.monotonic() + 10
    while not records and time.monotonic() < give_up:  # the log line follows the reply
        records = [json.loads(line) for line in server.lines if '"trace-42"' in line]
        time.sleep(0.02)
    assert records and records[-1]["status"] == "INVALID_ARGUMENT"
    assert records[-1]["model"] == "digits" and records[-1]["api"] == "classify"
    assert "junk" not in json.dumps(records[-1])  # the payload never reaches the log


def test_every_declared_metric_is_in_the_docs_table() -> None:
    from prometheus_client import REGISTRY

    import service.engine.metrics  # noqa: F401  (declares the metrics in the default registry)

    def family(name: str) -> str:  # a counter's family is named without its _total
        return name.removesuffix("_total")

    declared = {m.name for m in REGISTRY.collect() if m.name.startswith("convserve_")}
    declared |= {family(n) for n in (*GPU_METRICS, *WORKER_METRICS)}
    table = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    documented = {family(n) for n in re.findall(r"^\| `(convserve_\w+)` \|", table, flags=re.M)}
    assert len(declared) >= 15
    assert declared == documented
