"""KServe v2 over HTTP/REST against a real server process, through tritonclient.http.

The same server answers gRPC on its own port: REST answers are checked against ONNX Runtime
and against the gRPC answer, and the two protocols share the data plane, batches and metrics.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from onnx import TensorProto
from prometheus_client.parser import text_string_to_metric_families

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess
from tests import onnx_models

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
# Every datatype the gRPC side takes: a model per input type, features cast to float32.
DATATYPES = {
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "INT8": (TensorProto.INT8, np.int8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "INT16": (TensorProto.INT16, np.int16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "INT32": (TensorProto.INT32, np.int32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT64": (TensorProto.INT64, np.int64),
    "BOOL": (TensorProto.BOOL, np.bool_),
}
# The 2-second window waits for a second request, which max_batch_size 2 then runs at once.
PAIRS = {"max_batch_size": 2, "dynamic_batching": {"max_queue_delay_microseconds": 2_000_000}}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    for datatype, (onnx_type, _) in DATATYPES.items():
        onnx_models.linear(root / f"in_{datatype.lower()}" / "1", onnx_type, WEIGHT)
    onnx_models.linear(root / "half" / "1", TensorProto.FLOAT16, WEIGHT.astype(np.float16))
    onnx_models.linear(root / "double" / "1", TensorProto.DOUBLE, WEIGHT.astype(np.float64))
    onnx_models.linear(root / "pairs" / "1", TensorProto.FLOAT, WEIGHT, PAIRS)
    return root


@pytest.fixture(scope="module")
def server(repository: Path):
    with ServerProcess(repository, "--model-control-mode", "explicit", "--load-model", "*") as s:
        yield s


@pytest.fixture()
def client(server: ServerProcess):
    c = triton.InferenceServerClient(server.http_address)
    yield c
    c.close()


def digits_input(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def reference(repository: Path, x: np.ndarray) -> np.ndarray:
    path = repository / "digits" / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits", "7")
    meta = client.get_server_metadata()
    assert meta["name"] == "convserve"
    assert {"classification", "binary_tensor_data", "statistics"} <= set(meta["extensions"])
    model = client.get_model_metadata("digits", "1")
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


def test_model_config_reads_as_triton_writes_it(client) -> None:
    config = client.get_model_config("digits")
    assert config["name"] == "digits" and config["max_batch_size"] == 32  # numbers, not strings
    assert config["input"][0]["dims"] == [1, 8, 8]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["output"][0]["dims"] == [10]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert client.get_model_config("pairs", "1")["max_batch_size"] == 2


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_onnx_runtime_and_the_grpc_answer(
    client, server: ServerProcess, repository: Path, binary: bool
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("digits", [digits_input(x, binary)], outputs=[output], request_id="r1")
    logits = result.as_numpy("logits")
    np.testing.assert_allclose(logits, reference(repository, x), atol=1e-5)
    response = result.get_response()
    assert response["id"] == "r1" and response["model_version"] == "1"
    with triton_grpc.InferenceServerClient(server.grpc_address) as grpc_client:
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(
            grpc_client.infer("digits", [tensor]).as_numpy("logits"), logits
        )


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_of_the_grpc_side(client, datatype: str, binary: bool) -> None:
    dtype = DATATYPES[datatype][1]
    x = (np.arange(8).reshape(2, 4) % 3).astype(dtype)
    tensor = triton.InferInput("features", [2, 4], datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("scores", binary_data=binary)
    scores = client.infer(f"in_{datatype.lower()}", [tensor], outputs=[out]).as_numpy("scores")
    np.testing.assert_allclose(scores, x.astype(np.float32) @ WEIGHT, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(("model", "dtype"), [("half", np.float16), ("double", np.float64)])
def test_outputs_keep_their_datatype(client, model: str, dtype, binary: bool) -> None:
    x = np.ones((1, 4), dtype)
    tensor = triton.InferInput("features", [1, 4], "FP16" if dtype == np.float16 else "FP64")
    tensor.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("scores", binary_data=binary)
    scores = client.infer(model, [tensor], outputs=[out]).as_numpy("scores")
    assert scores.dtype == dtype
    np.testing.assert_allclose(scores.astype(np.float64), x @ WEIGHT.astype(dtype), rtol=1e-2)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_extension(client, binary: bool) -> None:
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    logits = client.infer("digits", [digits_input(x)]).as_numpy("logits")
    output = triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)
    labels = client.infer("digits", [digits_input(x)], outputs=[output]).as_numpy("logits")
    assert labels.shape == (2, 3)
    for row, entries in zip(logits, labels, strict=True):
        for index, entry in zip(np.argsort(-row)[:3], entries, strict=True):
            text = entry.decode() if isinstance(entry, bytes) else entry
            value, position, label = text.split(":")
            assert int(position) == index and label == str(index)
            assert float(value) == pytest.approx(row[index], abs=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_body(client, repository: Path, algorithm: str) -> None:
    x = np.random.default_rng(5).standard_normal((2, 1, 8, 8)).astype(np.float32)
    result = client.infer(
        "digits",
        [digits_input(x)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,  # answered uncompressed, which it reads
    )
    np.testing.assert_allclose(result.as_numpy("logits"), reference(repository, x), atol=1e-5)


def test_parameters_timeout_and_unknown_ones(client) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    result = client.infer("digits", [digits_input(x)], timeout=10_000_000, parameters={"k": "v"})
    assert result.as_numpy("logits").shape == (1, 10)


async def test_the_aio_client(server: ServerProcess, repository: Path) -> None:
    client = triton_aio.InferenceServerClient(server.http_address)
    try:
        assert await client.is_server_ready()
        xs = [np.full((1, 1, 8, 8), i / 10, np.float32) for i in range(8)]
        tensors = [digits_input(x) for x in xs]
        results = await asyncio.gather(*(client.infer("digits", [t]) for t in tensors))
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_allclose(
                result.as_numpy("logits"), reference(repository, x), atol=1e-5
            )
        assert (await client.get_model_metadata("digits"))["name"] == "digits"
    finally:
        await client.close()


def test_a_grpc_and_a_rest_request_share_one_batch(client, server: ServerProcess) -> None:
    x = np.ones((1, 4), np.float32)
    answers: list[object] = []

    def over_grpc() -> None:
        with triton_grpc.InferenceServerClient(server.grpc_address) as grpc_client:
            tensor = triton_grpc.InferInput("features", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            answers.append(grpc_client.infer("pairs", [tensor]).as_numpy("scores"))

    thread = threading.Thread(target=over_grpc)
    thread.start()
    tensor = triton.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    answers.append(client.infer("pairs", [tensor]).as_numpy("scores"))
    thread.join(30)
    for answer in answers:
        np.testing.assert_allclose(answer, x @ WEIGHT, rtol=1e-5)
    stats = client.get_inference_statistics("pairs")["model_stats"][0]
    assert stats["inference_count"] == 2 and stats["execution_count"] == 1
    assert [b["batch_size"] for b in stats["batch_stats"]] == [2]
    requests = samples(server, "convserve_requests_total", model="pairs", code="OK")
    assert requests == {"grpc": 1.0, "http": 1.0}


def samples(server: ServerProcess, name: str, **labels: str) -> dict[str, float]:
    """``name``'s samples matching ``labels``, by their protocol label."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                protocol = sample.labels["protocol"]
                found[protocol] = found.get(protocol, 0.0) + sample.value
    return found


def test_rest_requests_are_counted_with_the_http_protocol(client, server) -> None:
    def counts() -> tuple[dict[str, float], dict[str, float]]:
        return (
            samples(server, "convserve_requests_total", model="digits", api="kserve", code="OK"),
            samples(server, "convserve_request_duration_seconds_count", model="digits"),
        )

    before = counts()
    client.infer("digits", [digits_input(np.zeros((2, 1, 8, 8), np.float32))])
    with pytest.raises(triton.InferenceServerException):
        client.infer("digits", [digits_input(np.zeros((1, 1, 8, 9), np.float32))])
    after = counts()
    assert after[0].get("http", 0) == before[0].get("http", 0) + 1
    assert after[0].get("grpc", 0) == before[0].get("grpc", 0)
    assert after[1]["http"] == before[1].get("http", 0) + 2
    refused = samples(server, "convserve_requests_total", model="digits", code="INVALID_ARGUMENT")
    assert refused.get("http", 0) >= 1


def test_statistics_count_rest_requests(client) -> None:
    def stats() -> dict:
        return client.get_inference_statistics("digits", "1")["model_stats"][0]

    before = stats()
    for _ in range(3):
        client.infer("digits", [digits_input(np.zeros((1, 1, 8, 8), np.float32))])
    after = stats()
    assert after["inference_count"] == before["inference_count"] + 3
    success = after["inference_stats"]["success"]
    assert (
        isinstance(success["ns"], int)
        and success["count"] == before["inference_stats"]["success"]["count"] + 3
    )
    for kind in ("queue", "compute_infer", "cache_hit", "cache_miss"):  # what perf_analyzer reads
        assert set(after["inference_stats"][kind]) == {"count", "ns"}
    everything = {s["name"] for s in client.get_inference_statistics()["model_stats"]}
    assert {"digits", "pairs", "half"} <= everything


def test_repository_index_load_and_unload(client) -> None:
    index = {(m["name"], m.get("version"), m["state"]) for m in client.get_model_repository_index()}
    assert ("half", "1", "READY") in index
    client.unload_model("half")
    assert not client.is_model_ready("half")
    tensor = triton.InferInput("features", [1, 4], "FP16")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float16))
    with pytest.raises(triton.InferenceServerException) as error:
        client.infer("half", [tensor])
    assert error.value.status() == "404" and "model 'half' is not served" in str(error.value)
    client.load_model("half")
    assert client.is_model_ready("half")
    with pytest.raises(triton.InferenceServerException) as refused:
        client.load_model("half", files={"file:1/model.onnx": b"\x00"}, config="{}")
    assert refused.value.status() == "400" and "carries model files" in str(refused.value)
