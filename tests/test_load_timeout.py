"""``--model-load-timeout-seconds``: a load that hangs is abandoned; the served version goes on.

The server runs in this process, so that the test can make one version's build hang (a
monkeypatched ModelLoader) without any hook in the server's code.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import BUNDLED_REPOSITORY
from service._generated.inference import grpc_service_pb2 as pb
from service._generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.app import server as composition
from service.core.settings import Settings
from service.engine.model_loader import ModelLoader


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    return request


async def test_a_load_past_the_timeout_is_abandoned_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    settings = Settings(
        model_repository=tmp_path,
        host="127.0.0.1",
        grpc_port=free_port(),
        http_port=0,
        model_control_mode="explicit",
        load_model=("*",),
        model_load_timeout_seconds=1.0,
        drain_grace_seconds=0.0,
    )
    release = threading.Event()
    build = ModelLoader._build

    def hanging_version_2(self: ModelLoader, *args: object) -> object:
        if args[1] == 2:  # the fault: version 2's files take "forever" to load
            release.wait(60)
        return build(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelLoader, "_build", hanging_version_2)
    failures = {"model": "digits"}
    before = REGISTRY.get_sample_value("convserve_model_load_failures_total", failures) or 0
    parts = composition._build(settings, None)
    assert await composition._open_ports(parts)
    assert await composition._load(parts) == 0
    try:
        shutil.copytree(tmp_path / "digits" / "1", tmp_path / "digits" / "2")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
            assert time.monotonic() - started < 10
            assert error.value.code() == grpc.StatusCode.INTERNAL
            assert "took longer than --model-load-timeout-seconds (1 s)" in str(
                error.value.details()
            )
            # Version 1 goes on serving, and the server stays ready.
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="digits"))
            server_ready = await stub.ServerReady(pb.ServerReadyRequest())
            assert ready.ready and server_ready.ready
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
            assert list(metadata.versions) == ["1"]
            reply = await stub.ModelInfer(infer_request())
            assert reply.model_version == "1"
        after = REGISTRY.get_sample_value("convserve_model_load_failures_total", failures)
        assert after == before + 1
        # The abandoned build runs on in its thread; what it built is closed when it ends.
        with caplog.at_level(logging.WARNING, logger="service.engine.repository"):
            release.set()
            give_up = time.monotonic() + 30
            while "an abandoned load finished" not in caplog.text:
                assert time.monotonic() < give_up
                await asyncio.sleep(0.05)
        assert "closed digits version 2, digits_dense version 2" in caplog.text
    finally:
        release.set()
        await composition._drain(parts)
