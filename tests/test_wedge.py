"""A wedged server is restarted: a model call past ``--max-inference-seconds`` turns it not live.

The fault is a model, not a hook: ``onnx_models.endless`` loops ``max(x) * 10**12`` times, so
zeros (its warm-up) return at once and a 1 keeps one runtime thread busy for as good as ever.
Liveness (health service ``liveness``, the livenessProbe's, and ServerLive) turns NOT_SERVING;
a SIGTERM then drains for its grace and the process exits 1 without the wedged thread instead
of waiting for it forever.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from service.wire.health import LIVENESS, OVERALL
from tests import onnx_models

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def request(value: float) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="endless")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    message.raw_input_contents.append(np.full((1, 1), value, np.float32).tobytes())
    return message


def longest_inference(server: ServerProcess) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("convserve_longest_inference_seconds "):
            return float(line.split()[1])
    raise AssertionError("no convserve_longest_inference_seconds")


@pytest.fixture()
def endless_repository(tmp_path: Path) -> Path:
    onnx_models.endless(tmp_path / "endless" / "1", config={"max_batch_size": 4})
    return tmp_path


def test_a_wedged_inference_turns_liveness_not_serving(endless_repository: Path) -> None:
    server = ServerProcess(
        endless_repository,
        "--max-inference-seconds",
        "1",
        "--drain-grace-seconds",
        "1",
        "--inline-compute-microseconds",
        "0",  # in a runtime thread, as any model that is not tiny
    ).start()
    try:
        with grpc.insecure_channel(server.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)

            def status(name: str) -> int:
                return int(health.Check(health_pb2.HealthCheckRequest(service=name)).status)

            assert kserve.ModelInfer(request(0.0), timeout=10).raw_output_contents
            time.sleep(1.5)  # longer than the bound: calls that return leave it live
            assert status(LIVENESS) == SERVING
            assert kserve.ServerLive(pb.ServerLiveRequest()).live

            wedged = kserve.ModelInfer.future(request(1.0), timeout=120)
            give_up = time.monotonic() + 20
            while status(LIVENESS) == SERVING and time.monotonic() < give_up:
                time.sleep(0.1)
            assert status(LIVENESS) == NOT_SERVING
            assert not kserve.ServerLive(pb.ServerLiveRequest()).live
            assert status(OVERALL) == SERVING  # the probes' readiness is the other question
            assert longest_inference(server) > 1.0
            assert "--max-inference-seconds 1: the server is wedged" in server.log_with("wedged")
            assert not wedged.done()

            server.signal(signal.SIGTERM)
            began = time.monotonic()
            assert server.wait(30) == 1
        assert time.monotonic() - began < 10  # the grace and a moment, not the wedged call
        log = server.log()
        assert "the drain grace ended; cancelling 1 calls" in log
        assert "exiting without them" in log
        assert wedged.exception() is not None  # its client is told, not left waiting
    finally:
        server.stop()
