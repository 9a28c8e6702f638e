"""``convserve serve``: flags, their environment variables, logging formats, /metrics."""

from __future__ import annotations

import json
import queue
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service.core.settings import Settings
from service.tools.server_process import ServerProcess


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    from service.__main__ import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    helps: dict[str, str] = {}
    for action in serve._actions:  # a boolean's --no-x shares its dest: the flag's own help
        helps.setdefault(action.dest, action.help or "")
    for name in Settings.__dataclass_fields__:
        assert f"[CONVSERVE_{name.upper()}; default: " in helps[name], name
    assert helps["drain_grace_seconds"].endswith("default: 20.0]")
    assert helps["preferred_batch_size"].endswith("default: none]")


def test_environment_variables_configure_the_server(monkeypatch) -> None:
    from service.__main__ import build_parser
    from service.core.flags import from_arguments

    monkeypatch.setenv("CONVSERVE_GRPC_PORT", "9123")
    monkeypatch.setenv("CONVSERVE_PREFERRED_BATCH_SIZE", "4,8")
    monkeypatch.setenv("CONVSERVE_DEVICE", "cpu")
    args = build_parser().parse_args(["serve", "--metrics-port", "9124"])
    settings = from_arguments(args)
    assert settings.grpc_port == 9123 and settings.metrics_port == 9124
    assert settings.preferred_batch_size == (4, 8) and settings.device == "cpu"
    flag_wins = from_arguments(build_parser().parse_args(["serve", "--grpc-port", "7"]))
    assert flag_wins.grpc_port == 7


def test_invalid_setting_is_one_clear_line() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--device", "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        "convserve serve: error: --device must be auto, cpu, cuda or cuda:N, got 'tpu'\n"
    )


def test_a_setting_out_of_range_is_a_setting_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Settings refuse a bad value with SettingError; the command line prints it as one line."""
    from service.__main__ import main
    from service.core.settings import SettingError

    with pytest.raises(SettingError, match=r"^invalid setting max_batch_size=0$"):
        Settings(max_batch_size=0)
    assert issubclass(SettingError, ValueError)
    assert main(["serve", "--max-batch-size", "0"]) == 1
    assert capsys.readouterr().err == "convserve serve: error: invalid setting max_batch_size=0\n"


def test_an_environment_variable_no_setting_can_take_is_a_setting_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read while the parser is built, so it ends every command, as a usage error (exit 2)."""
    from service.__main__ import main

    monkeypatch.setenv("CONVSERVE_GRPC_PORT", "abc")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "convserve: error: invalid setting grpc_port from CONVSERVE_GRPC_PORT='abc'\n"
    )


def test_json_logs_and_ports_from_the_environment() -> None:
    server = ServerProcess(
        BUNDLED_REPOSITORY, "--log-format", "json", env={"CONVSERVE_MAX_BATCH_SIZE": "8"}
    ).start()
    try:
        records = [json.loads(line) for line in server.lines if line.startswith("{")]
        assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
        assert any("grpc listening on 127.0.0.1:" in r["message"] for r in records)
        with triton.InferenceServerClient(server.grpc_address) as client:
            assert client.get_model_config("digits").config.max_batch_size == 8
    finally:
        assert server.stop() == 0


def test_metrics_endpoint_counts_requests() -> None:
    with (
        ServerProcess(BUNDLED_REPOSITORY) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        x = np.zeros((2, 1, 8, 8), np.float32)
        tensor = triton.InferInput("input", [2, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(x)
        client.infer("digits", [tensor])
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert (
            'convserve_requests_total{api="kserve",code="OK",model="digits",protocol="grpc",'
            'version="1"} 1.0'
        ) in text
        assert 'convserve_inferences_total{model="digits"} 2.0' in text
        assert (
            'convserve_model_ready{model="digits_dense",provider="CPUExecutionProvider",'
            'version="1"} 1.0' in text
        )


def test_stream_infer() -> None:
    with (
        ServerProcess(BUNDLED_REPOSITORY) as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        answers: queue.Queue[object] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        for i in range(5):
            tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1, 8, 8), i, np.float32))
            client.async_stream_infer("digits", [tensor], request_id=str(i))
        bad = triton.InferInput("input", [1, 1, 8, 9], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 8, 9), np.float32))
        client.async_stream_infer("digits", [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(6)]
        client.stop_stream()
        ids = sorted(r.get_response().id for r in got if hasattr(r, "get_response"))
        assert ids == ["0", "1", "2", "3", "4"]
        errors = [r for r in got if not hasattr(r, "get_response")]
        assert len(errors) == 1 and "does not match the model's" in str(errors[0])
        # more messages than one stream may have in the server at once (STREAM_IN_FLIGHT)
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        for i in range(300):
            tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(np.full((1, 1, 8, 8), i % 7, np.float32))
            client.async_stream_infer("digits", [tensor], request_id=f"many-{i}")
        many = [answers.get(timeout=60) for _ in range(300)]
        client.stop_stream()
        assert sorted(r.get_response().id for r in many) == sorted(f"many-{i}" for i in range(300))
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        for code, count in (("OK", 305), ("INVALID_ARGUMENT", 1)):
            assert (
                f'convserve_requests_total{{api="kserve",code="{code}",model="digits",'
                f'protocol="grpc",version="1"}} {count}.0'
            ) in text, text


def test_max_connection_age_closes_old_connections_without_failing_calls() -> None:
    """--max-connection-age 1: each connection ends after about a second; no call fails.

    Seen from the channel's own states: READY more than once means it reconnected.
    """
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with (
        ServerProcess(BUNDLED_REPOSITORY, "--max-connection-age", "1") as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=True)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # spans several connection lifetimes
            reply = health.Check(health_pb2.HealthCheckRequest(service="digits"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.02)
        channel.unsubscribe(states.append)
    ready = grpc.ChannelConnectivity.READY
    connections = sum(
        1
        for before, after in zip([None, *states], states, strict=False)
        if after == ready and before != ready
    )
    assert connections >= 2, states  # the first connection was closed and a new one opened


def test_a_failed_load_leaves_no_stale_not_ready_series(tmp_path: Path) -> None:
    """Load a broken model over gRPC (gauge 0, provider "none"), mend it, load again: ready 1."""
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    with (
        ServerProcess(tmp_path, "--model-control-mode", "explicit", "--load-model", "*") as server,
        triton.InferenceServerClient(server.grpc_address) as client,
    ):
        (tmp_path / "late" / "1").mkdir(parents=True)
        (tmp_path / "late" / "1" / "model.onnx").write_bytes(b"not onnx")
        with pytest.raises(InferenceServerException, match="failed to load"):
            client.load_model("late")
        stale = 'convserve_model_ready{model="late",provider="none",version=""} 0.0'
        assert stale in urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        shutil.copy(
            BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx",
            tmp_path / "late" / "1" / "model.onnx",
        )
        client.load_model("late")
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert stale not in text and 'model="late",provider="none"' not in text
        assert (
            'convserve_model_ready{model="late",provider="CPUExecutionProvider",version="1"} 1.0'
            in text
        )
