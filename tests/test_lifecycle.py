"""Health, reflection, graceful drain, reloads and deadlines, against real server processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess
from tests import onnx_models

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def slow_input(rows: int = 1) -> triton.InferInput:
    tensor = triton.InferInput("x", [rows, 1024], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 1024), 0.5, np.float32))
    return tensor


@pytest.fixture()
def slow_repository(tmp_path: Path) -> Path:
    onnx_models.slow(tmp_path / "slow" / "1", depth=64, config={"max_batch_size": 4})
    return tmp_path


EXPLICIT = ("--model-control-mode", "explicit", "--load-model", "*")
"""Flags of a server whose models are loaded and unloaded over the API (every one at the start)."""


def grpcurl() -> str:
    return str(Path(sys.executable).parent / "grpcurl")


def test_health_per_model_and_overall_then_draining(slow_repository: Path) -> None:
    shutil.copytree(BUNDLED_REPOSITORY / "digits", slow_repository / "digits")
    server = ServerProcess(slow_repository).start()
    try:
        with grpc.insecure_channel(server.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "digits", "digits_dense", "slow"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == SERVING, name
            with pytest.raises(grpc.RpcError) as error:
                health.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == SERVING
            server.signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
        assert server.wait(30) == 0
    finally:
        server.stop()


def test_reflection_lists_services_with_grpcurl() -> None:
    with ServerProcess(BUNDLED_REPOSITORY) as server:
        result = subprocess.run(
            [grpcurl(), "-plaintext", server.grpc_address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        services = result.stdout.split()
        assert "inference.GRPCInferenceService" in services
        assert "grpc.health.v1.Health" in services
        described = subprocess.run(
            [
                grpcurl(),
                "-plaintext",
                "-d",
                '{"name": "digits"}',
                server.grpc_address,
                "inference.GRPCInferenceService/ModelMetadata",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert '"platform": "onnxruntime_onnx"' in described.stdout, described.stderr


def inflight(server: ServerProcess) -> float:
    """The server's convserve_inflight_requests, scraped."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "convserve_inflight_requests":
            return sum(sample.value for sample in family.samples)
    return 0.0


def test_sigterm_under_load_fails_no_accepted_request(slow_repository: Path) -> None:
    server = ServerProcess(slow_repository, "--drain-grace-seconds", "30").start()
    client = triton.InferenceServerClient(server.grpc_address)
    accepted: list[object] = []
    lock = threading.Lock()
    all_in = threading.Event()

    def callback(result, error) -> None:
        with lock:
            accepted.append(error or result.as_numpy("y"))

    try:
        for _ in range(12):  # 12 batches of 4 rows, one after another
            client.async_infer("slow", [slow_input(4)], callback=callback)
        # SIGTERM once the first answer is in and the server holds every other request (its
        # in-flight gauge): a request still on its way when the drain starts is refused, rightly.
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            with lock:
                answered = len(accepted)
            if answered and answered + inflight(server) >= 12:
                break
            time.sleep(0.005)
        server.signal(signal.SIGTERM)
        assert answered < 12, "every request had finished before SIGTERM: the test tests nothing"
        started = time.monotonic()
        code = server.wait(60)
        all_in.set()
        assert code == 0
        assert time.monotonic() - started < 30
        assert len(accepted) == 12
        failures = [a for a in accepted if not isinstance(a, np.ndarray)]
        assert not failures, [(str(f.status()), f.message()) for f in failures]
        assert "draining" in server.log()
        with pytest.raises(InferenceServerException) as error:
            client.infer("slow", [slow_input()], client_timeout=5)
        assert "UNAVAILABLE" in str(error.value.status())
    finally:
        client.close()
        server.stop()


def test_reload_with_a_new_version_while_traffic_flows(slow_repository: Path) -> None:
    digits = slow_repository / "digits"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", digits)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with (
        ServerProcess(slow_repository, *EXPLICIT) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        stop = threading.Event()
        versions: list[str] = []
        errors: list[Exception] = []

        def traffic() -> None:
            with triton.InferenceServerClient(server.grpc_address) as own:
                while not stop.is_set():
                    tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
                    tensor.set_data_from_numpy(x)
                    try:
                        versions.append(own.infer("digits", [tensor]).get_response().model_version)
                    except InferenceServerException as exc:
                        errors.append(exc)

        readiness: list[tuple[bool, int, set[tuple[str, str]]]] = []

        def probe() -> None:  # what a readiness probe and a dashboard see during the reload
            with (
                triton.InferenceServerClient(server.grpc_address) as own,
                grpc.insecure_channel(server.grpc_address) as channel,
            ):
                health = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    index = {(m.name, m.state) for m in own.get_model_repository_index().models}
                    status = health.Check(health_pb2.HealthCheckRequest()).status
                    readiness.append((own.is_server_ready(), status, index))

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        workers.append(threading.Thread(target=probe))
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        shutil.copytree(digits / "1", digits / "2")
        client.load_model("digits")
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join(30)
        assert not errors, errors[:3]
        assert versions[0] == "1" and versions[-1] == "2"
        assert client.get_model_metadata("digits").versions == ["2"]
        # Ready all along, the served names READY in the index (not LOADING) while version 2
        # loaded, and the overall health SERVING after the load as before it.
        assert readiness and all(ready for ready, _, _ in readiness)
        assert all(status == SERVING for _, status, _ in readiness)
        assert all({("digits", "READY"), ("digits_dense", "READY")} <= i for _, _, i in readiness)
        client.unload_model("digits")
        assert not client.is_model_ready("digits")
        index = {(m.name, m.state) for m in client.get_model_repository_index().models}
        assert ("digits", "UNAVAILABLE") in index
        # Unloading what is not loaded, or never was, succeeds with nothing to do (Triton's API),
        # and invents no entry; loading what is not on disk is still NOT_FOUND.
        client.unload_model("digits")
        client.unload_model("never_was")
        assert "never_was" not in {m.name for m in client.get_model_repository_index().models}
        with pytest.raises(InferenceServerException) as missing:
            client.load_model("never_was")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        client.load_model("digits")
        assert client.is_model_ready("digits") and client.is_model_ready("digits_dense")
        with grpc.insecure_channel(server.grpc_address) as channel:  # SERVING again, for good
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING


def test_a_failed_reload_leaves_the_served_version_serving_and_the_server_ready(
    tmp_path: Path,
) -> None:
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    with (
        ServerProcess(tmp_path, *EXPLICIT) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        (tmp_path / "digits" / "config.json").write_text('{"max_batch_sise": 4}')
        with pytest.raises(InferenceServerException) as error:
            client.load_model("digits")
        assert "max_batch_sise" in str(error.value)
        assert client.is_server_ready() and client.is_model_ready("digits")
        index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
        assert index == {("digits", "1", "READY"), ("digits_dense", "1", "READY")}
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
        tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        assert client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)
        server.log_with("reloading digits failed, its served versions go on")


def test_a_failed_load_then_its_unload_leaves_every_answer_ready_and_no_series(
    tmp_path: Path,
) -> None:
    """The audit: "" stayed NOT_SERVING, and the broken model's gauge at 0, after its unload."""
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    with (
        ServerProcess(tmp_path, *EXPLICIT) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        (tmp_path / "broken" / "1").mkdir(parents=True)
        (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
        for attempt in range(2):  # failed, unloaded; and again
            with pytest.raises(InferenceServerException, match="failed to load"):
                client.load_model("broken")
            # A model whose first load failed is not meant to be served: all say ready.
            assert client.is_server_ready()
            assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
            client.unload_model("broken")
            assert client.is_server_ready() and client.is_model_ready("digits")
            assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service="digits")).status == SERVING
            text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            assert 'convserve_model_ready{model="broken"' not in text
            assert f'convserve_model_load_failures_total{{model="broken"}} {attempt + 1}' in text
            assert 'convserve_model_ready{model="digits",' in text


def test_timeout_parameter_and_grpc_deadline(slow_repository: Path) -> None:
    with (
        ServerProcess(slow_repository) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        outcomes: list[object] = []
        for _ in range(6):  # a queue several batches deep
            client.async_infer(
                "slow",
                [slow_input(4)],
                callback=lambda result, error: outcomes.append(error or result),
            )
        with pytest.raises(InferenceServerException) as error:
            client.infer("slow", [slow_input()], timeout=1000)  # Triton's µs parameter
        assert "DEADLINE_EXCEEDED" in str(error.value.status())
        with pytest.raises(InferenceServerException) as error:
            client.infer("slow", [slow_input()], client_timeout=0.001)
        assert "DEADLINE_EXCEEDED" in str(error.value.status())
        deadline = time.monotonic() + 60
        while len(outcomes) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(outcomes) == 6  # the queued requests without deadlines all finished
        assert all(not isinstance(o, Exception) for o in outcomes)
        assert client.infer("slow", [slow_input()]).as_numpy("y").shape == (1, 1024)


def serve_until_exit(repository: Path) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to give up at startup."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model-repository",
            str(repository),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_startup_fails_clearly_on_a_broken_model(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx at all")
    result = serve_until_exit(tmp_path)
    assert result.returncode == 1
    assert "model 'broken' failed to load: " in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_json_is_refused(tmp_path: Path) -> None:
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    (tmp_path / "digits" / "config.json").write_text('{"max_batch_sise": 8}')
    result = serve_until_exit(tmp_path)
    assert result.returncode == 1
    assert "unknown field max_batch_sise" in result.stderr


@pytest.mark.parametrize(("choice", "logged"), [("auto", "uvloop "), ("asyncio", "asyncio")])
def test_event_loop_choice_serves_logs_and_drains(choice: str, logged: str) -> None:
    import onnxruntime as ort

    model = BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx"
    image = np.random.default_rng(5).random((1, 1, 8, 8), dtype=np.float32)
    server = ServerProcess(BUNDLED_REPOSITORY, "--event-loop", choice).start()
    try:
        assert f"event loop: {logged}" in server.log()
        tensor = triton.InferInput("input", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        reply = triton.InferenceServerClient(server.grpc_address).infer("digits", [tensor])
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, {"input": image})
        np.testing.assert_allclose(reply.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
        server.signal(signal.SIGTERM)  # the signal handlers are the loop's
        assert server.wait(30) == 0
        assert "stopped" in server.log()
    finally:
        server.stop()


def test_event_loop_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core import event_loop

    assert event_loop.loop_factory("auto") is not None  # a dependency, so installed here
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert event_loop.loop_factory("auto") is None
    assert event_loop.loop_factory("asyncio") is None
    with pytest.raises(ValueError, match="uvloop is not installed"):
        event_loop.loop_factory("uvloop")
    with pytest.raises(ValueError, match="must be one of auto, uvloop, asyncio"):
        event_loop.loop_factory("trio")
