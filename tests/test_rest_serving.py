"""The REST port as a server: overload and deadlines, restricted groups, drain, workers, flags."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from onnx import TensorProto
from prometheus_client.parser import text_string_to_metric_families

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess
from tests import onnx_models
from tests.test_restricted import refusals

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
# A lone request waits out the 3-second window in the queue: in flight for as long.
WAITS = {
    "max_batch_size": 4,
    "dynamic_batching": {
        "max_queue_delay_microseconds": 3_000_000,
        "default_queue_policy": {"max_queue_size": 1},
    },
}
HEADER = "admin-key"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    onnx_models.linear(root / "waits" / "1", TensorProto.FLOAT, WEIGHT, WAITS)
    return root


def infer_body(rows: int = 1, **parameters: object) -> bytes:
    tensor = {"name": "features", "datatype": "FP32", "shape": [rows, 4], "data": [1.0] * 4 * rows}
    return json.dumps({"inputs": [tensor], "parameters": parameters}).encode()


def post(
    url: str, body: bytes | None, headers: dict[str, str] | None = None
) -> tuple[int, dict, object]:
    """The status, headers and JSON body (None when empty) of a request to ``url``."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, head, text = answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        status, head, text = error.code, dict(error.headers), error.read()
    return status, head, json.loads(text) if text else None


@pytest.fixture(scope="module")
def restricted(repository: Path) -> Iterator[ServerProcess]:
    flag = f"inference,statistics:{HEADER}=s3cret"
    with ServerProcess(repository, "--http-restricted-api", flag) as server:
        yield server


def test_a_full_queue_is_503_and_a_passed_timeout_504(restricted: ServerProcess) -> None:
    url = restricted.http_url + "/v2/models/waits/infer"
    first: list[tuple[int, dict, object]] = []
    waiting = threading.Thread(
        target=lambda: first.append(post(url, infer_body(), {HEADER: "s3cret"}))
    )
    waiting.start()  # waits out the window, holding the one place of the queue
    deadline = time.monotonic() + 10
    while gauge(restricted, "convserve_queue_depth", "waits") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, _, answer = post(url, infer_body(), {HEADER: "s3cret"})
    assert status == 503 and "queue full" in answer["error"], answer
    waiting.join(30)
    assert first[0][0] == 200
    status, _, answer = post(url, infer_body(timeout=50_000), {HEADER: "s3cret"})
    assert status == 504 and "deadline" in answer["error"], answer


def gauge(server: ServerProcess, name: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return float(sample.value)
    return 0.0


def test_restricted_groups_answer_403_without_their_header(restricted: ServerProcess) -> None:
    before = refusals(restricted, "inference")
    url = restricted.http_url + "/v2/models/digits/infer"
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                     "data": [0.0] * 64}]}
    ).encode()  # fmt: skip
    for headers in ({}, {HEADER: "wrong"}):
        status, _, answer = post(url, body, headers)
        assert status == 403
        assert answer == {"error": f"This API is restricted, expecting header '{HEADER}'"}
    assert refusals(restricted, "inference") == before + 2
    assert post(url, body, {HEADER: "s3cret"})[0] == 200
    client = triton.InferenceServerClient(restricted.http_address)
    try:
        assert client.is_server_ready() and client.get_model_metadata("digits")["name"]
        with pytest.raises(triton.InferenceServerException) as error:
            client.get_inference_statistics("digits")
        assert error.value.status() == "403"
        stats = client.get_inference_statistics("digits", headers={HEADER: "s3cret"})
        assert stats["model_stats"][0]["name"] == "digits"
    finally:
        client.close()
    with triton_grpc.InferenceServerClient(restricted.grpc_address) as grpc_client:
        assert grpc_client.get_inference_statistics("digits")  # the gRPC port is not restricted


def test_a_drain_answers_rest_requests_in_flight_and_refuses_new_ones(repository: Path) -> None:
    server = ServerProcess(repository).start()
    try:
        url = server.http_url + "/v2/models/waits/infer"
        answered: list[tuple[int, dict, object]] = []
        flight = threading.Thread(target=lambda: answered.append(post(url, infer_body(2))))
        flight.start()
        deadline = time.monotonic() + 10
        while gauge(server, "convserve_queue_depth", "waits") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.signal(signal.SIGTERM)
        server.log_with("draining: finishing in-flight requests")
        status, headers, answer = post(server.http_url + "/v2/models/digits/infer", b"{}")
        assert status == 503 and "shutting down" in answer["error"]
        assert headers.get("Connection") == "close"
        assert post(server.http_url + "/v2/health/ready", None)[0] == 400
        flight.join(30)
        status, _, answer = answered[0]
        assert status == 200
        expected = np.ones((2, 4), np.float32) @ WEIGHT
        np.testing.assert_allclose(answer["outputs"][0]["data"], expected.ravel(), rtol=1e-5)
        assert server.wait(30) == 0
    finally:
        server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.http_port), 2):
        pass


def test_two_workers_serve_rest_on_one_port(repository: Path) -> None:
    with ServerProcess(repository, "--workers", "2") as server:
        url = server.http_url + "/v2/models/waits/infer"
        for _ in range(16):  # a connection each: the kernel spreads them over the workers
            assert post(url, infer_body())[0] == 200
        stats = server.http_url + "/v2/models/waits/stats"
        everything = post(stats, None)[2]["model_stats"][0]["inference_count"]
        assert everything == 16  # every worker's figures, summed
        own = {
            post(stats, None, {"convserve-worker-local": "1"})[2]["model_stats"][0][
                "inference_count"
            ]
            for _ in range(16)
        }
        assert 16 not in own  # each worker answered some: neither holds all the figures
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert (
            'convserve_requests_total{api="kserve",code="OK",model="waits",protocol="http",'
            'version="1"} 16.0' in text
        )


def test_allow_http_false_opens_no_http_port(repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        # --http-port names a busy port, which is never touched
        flags = ("--allow-http=false", "--http-port", port)
        with ServerProcess(repository, *flags) as server:
            assert server.http_port == 0 and "http listening" not in server.log()
            with triton_grpc.InferenceServerClient(server.grpc_address) as client:
                assert client.is_server_ready()


def test_a_busy_http_port_is_named_with_its_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1"]
        command += ["--grpc-port", "0", "--metrics-port", "0", "--http-port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert (
        f"the HTTP port {port} on 127.0.0.1 is already in use (another convserve?): choose "
        "another with --http-port or CONVSERVE_HTTP_PORT, or 0 for a free one"
    ) in result.stderr
    assert "Traceback" not in result.stderr
