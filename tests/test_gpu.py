"""CUDA paths: the provider really runs and agrees with the CPU. Skipped without a usable GPU."""

from __future__ import annotations

import contextlib
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service import BUNDLED_REPOSITORY
from service.engine.runtime import DeviceChoice, Runtime

pytestmark = pytest.mark.gpu

DIGITS = BUNDLED_REPOSITORY / "digits" / "1"


def _cuda_unusable() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider"
    with contextlib.suppress(Exception):  # best effort, as in the server
        ort.preload_dlls()
    session = ort.InferenceSession(
        str(DIGITS / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "no usable CUDA device (the CUDA provider fell back to the CPU)"
    return None


REASON = _cuda_unusable()
if REASON:
    pytest.skip(REASON, allow_module_level=True)


@pytest.mark.parametrize(
    ("filename", "shape"), [("model.onnx", (16, 1, 8, 8)), ("model.dense.onnx", (2, 1, 24, 40))]
)
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto"])
def test_cuda_runtime_matches_cpu(filename: str, shape: tuple[int, ...], device: str) -> None:
    path = DIGITS / filename
    dense = filename.endswith("dense.onnx")
    gpu = Runtime(path, DeviceChoice(device), 1, 0, dynamic_shapes=dense)
    cpu = Runtime(path, DeviceChoice("cpu"), 1, 0, dynamic_shapes=dense)
    assert gpu.provider == "CUDAExecutionProvider" and gpu.on_cuda
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got, expected = gpu.run({"input": x})[0], cpu.run({"input": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def test_server_on_cuda(tmp_path: Path) -> None:
    tritonclient = pytest.importorskip("tritonclient.grpc")
    from service.tools.server_process import ServerProcess

    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    cpu = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CPUExecutionProvider"])
    with (
        ServerProcess(BUNDLED_REPOSITORY, "--device", "cuda") as server,
        tritonclient.InferenceServerClient(server.grpc_address) as client,
    ):
        tensor = tritonclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("digits", [tensor]).as_numpy("logits")
        np.testing.assert_allclose(got, cpu.run(None, {"input": x})[0], atol=1e-3)
        config = client.get_model_config("digits").config
        assert config.instance_group[0].kind == 1  # KIND_GPU
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert 'provider="CUDAExecutionProvider"' in text
        assert "running on CUDA device 0" in server.log()


def test_gpu_gauges_with_nvml() -> None:
    pytest.importorskip("pynvml")
    from service.tools.server_process import ServerProcess

    with ServerProcess(BUNDLED_REPOSITORY, "--device", "cuda") as server:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'convserve_gpu_memory_total_bytes{gpu="0"}' in text
    assert 'convserve_gpu_utilization_ratio{gpu="0"}' in text
    assert 'convserve_model_device_memory_bytes{model="digits"}' in text
