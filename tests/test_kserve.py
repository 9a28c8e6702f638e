"""KServe v2 over gRPC against a real server process, through the standard client tritonclient."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess
from tests import onnx_models

WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    onnx_models.linear(root / "half" / "1", TensorProto.FLOAT16, WEIGHT.astype(np.float16))
    onnx_models.linear(root / "bytes8" / "1", TensorProto.UINT8, WEIGHT)
    onnx_models.slow(root / "slow" / "1", config={"max_batch_size": 16})
    # no batch axis: the first dimension is the model's own
    onnx_models.linear(root / "unbatched" / "1", TensorProto.FLOAT, WEIGHT, {"max_batch_size": 0})
    # config.json asks for batching, but the first dimension is fixed: batching is off
    fixed = onnx_models.linear(
        root / "fixed" / "1", TensorProto.FLOAT, WEIGHT, {"max_batch_size": 4}
    )
    model = onnx.load(fixed)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 3
    onnx.save(model, fixed)
    onnx_models.gather(
        root / "gather" / "1",
        config={"max_batch_size": 4, "dynamic_batching": {"max_queue_delay_microseconds": 300_000}},
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path):
    with ServerProcess(
        repository, "--max-message-bytes", str(4 << 20), "--max-tensor-elements", str(1 << 20)
    ) as process:
        yield process


@pytest.fixture()
def client(server: ServerProcess):
    with triton.InferenceServerClient(server.grpc_address) as c:
        yield c


def digits_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def reference(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_server_and_model_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "convserve" and "classification" in meta.extensions
    model = client.get_model_metadata("digits")
    assert model.versions == ["1"] and model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("input", "FP32", [-1, 1, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    dense = client.get_model_metadata("digits_dense")
    assert list(dense.inputs[0].shape) == [-1, 1, -1, -1]
    assert list(dense.outputs[0].shape) == [-1, 10, -1, -1]
    assert client.is_model_ready("digits_dense") and not client.is_model_ready("nope")


def test_model_config(client) -> None:
    config = client.get_model_config("digits").config
    assert config.max_batch_size == 32
    assert [list(i.dims) for i in config.input] == [[1, 8, 8]]
    assert [list(o.dims) for o in config.output] == [[10]]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    gather = client.get_model_config("gather").config
    assert gather.max_batch_size == 4
    assert gather.dynamic_batching.max_queue_delay_microseconds == 300_000
    # No batch axis: dims are the whole shape, and there is no dynamic batching to describe.
    unbatched = client.get_model_config("unbatched").config
    assert unbatched.max_batch_size == 0
    assert not unbatched.HasField("dynamic_batching")
    assert [list(i.dims) for i in unbatched.input] == [[-1, 4]]


def test_a_fixed_first_dimension_turns_batching_off(client, server: ServerProcess) -> None:
    assert client.get_model_config("fixed").config.max_batch_size == 0
    assert "fixed v1: first input dimension is fixed, so batching is off" in server.log()
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    tensor = triton.InferInput("features", [3, 4], "FP32")
    tensor.set_data_from_numpy(x)
    results: list[object] = []
    done = threading.Semaphore(0)

    def callback(result, error) -> None:
        results.append(error or result)
        done.release()

    for _ in range(3):  # at once: each runs alone, with all three rows its own
        client.async_infer("fixed", [tensor], callback=callback)
    for _ in range(3):
        assert done.acquire(timeout=30)
    for result in results:
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result.as_numpy("scores"), x @ WEIGHT, rtol=1e-5, atol=1e-6)


def test_sync_infer_matches_onnx_runtime(client, repository: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    result = client.infer("digits", [digits_input(x)], request_id="abc")
    expected = reference(repository / "digits" / "1" / "model.onnx", {"input": x})
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    assert result.get_response().id == "abc"
    assert result.get_response().model_version == "1"


def test_dense_twin_serves_any_size(client, repository: Path) -> None:
    for height, width in ((8, 8), (12, 20), (9, 31)):
        x = np.random.default_rng(height).standard_normal((2, 1, height, width))
        x = x.astype(np.float32)
        result = client.infer("digits_dense", [digits_input(x)])
        expected = reference(repository / "digits" / "1" / "model.dense.onnx", {"input": x})
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "datatype", "dtype"), [("half", "FP16", np.float16), ("bytes8", "UINT8", np.uint8)]
)
def test_fp16_and_uint8_plain_models(client, model: str, datatype: str, dtype) -> None:
    x = (np.arange(8).reshape(2, 4) % 5).astype(dtype)
    tensor = triton.InferInput("features", [2, 4], datatype)
    tensor.set_data_from_numpy(x)
    scores = client.infer(model, [tensor]).as_numpy("scores")
    expected = x.astype(np.float32) @ WEIGHT
    np.testing.assert_allclose(scores.astype(np.float32), expected, rtol=1e-2)
    assert scores.dtype == (np.float16 if model == "half" else np.float32)


def test_many_concurrent_async_infers_each_get_their_own_answer(client, repository) -> None:
    rng = np.random.default_rng(1)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 4)), 1, 8, 8)).astype(np.float32)
        for _ in range(120)
    ]
    results: dict[int, object] = {}
    done = threading.Event()

    def callback(index: int, result, error) -> None:
        results[index] = error or result.as_numpy("logits")
        if len(results) == len(inputs):
            done.set()

    for index, x in enumerate(inputs):
        client.async_infer(
            "digits",
            [digits_input(x)],
            callback=lambda result, error, i=index: callback(i, result, error),
        )
    assert done.wait(60)
    session = ort.InferenceSession(
        str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for index, x in enumerate(inputs):
        assert isinstance(results[index], np.ndarray), results[index]
        np.testing.assert_allclose(results[index], session.run(None, {"input": x})[0], atol=1e-5)


def test_concurrent_requests_share_a_batch(client) -> None:
    x = np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float32)
    done = threading.Event()
    answers: list[object] = []

    def callback(result, error) -> None:
        answers.append(error or result.as_numpy("y"))
        if len(answers) == 24:
            done.set()

    for _ in range(24):
        tensor = triton.InferInput("x", [1, 1024], "FP32")
        tensor.set_data_from_numpy(x)
        client.async_infer("slow", [tensor], callback=callback)
    assert done.wait(60)
    assert all(isinstance(a, np.ndarray) for a in answers)
    stats = client.get_inference_statistics("slow").model_stats[0]
    sizes = {int(b.batch_size) for b in stats.batch_stats}
    assert max(sizes) > 1, sizes  # the runtime saw batches of several requests
    assert stats.inference_count == 24 and stats.execution_count < 24


def test_classification_extension(client) -> None:
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    logits = client.infer("digits", [digits_input(x)]).as_numpy("logits")
    output = triton.InferRequestedOutput("logits", class_count=3)
    labels = client.infer("digits", [digits_input(x)], outputs=[output]).as_numpy("logits")
    assert labels.shape == (2, 3)
    for row, entries in zip(logits, labels, strict=True):
        top = np.argsort(-row)[:3]
        for index, entry in zip(top, entries, strict=True):
            value, position, label = entry.decode().split(":")
            assert int(position) == index and label == str(index)
            assert float(value) == pytest.approx(row[index], abs=1e-5)
    # a score map ([N, K, H', W']) has no one score per class to rank
    dense = triton.InferRequestedOutput("logits", class_count=3)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(
            "digits_dense", [digits_input(np.zeros((1, 1, 10, 10), np.float32))], outputs=[dense]
        )
    assert "INVALID_ARGUMENT" in str(refused.value.status())
    assert "needs one score per class" in str(refused.value)


def test_a_model_without_a_batch_axis_answers_whole_and_ranks(client) -> None:
    x = np.random.default_rng(8).standard_normal((2, 4)).astype(np.float32)
    tensor = triton.InferInput("features", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    scores = client.infer("unbatched", [tensor]).as_numpy("scores")
    np.testing.assert_allclose(scores, x @ WEIGHT, rtol=1e-5, atol=1e-6)
    ranked = client.infer(
        "unbatched", [tensor], outputs=[triton.InferRequestedOutput("scores", class_count=2)]
    ).as_numpy("scores")
    assert ranked.shape == (2, 2)
    for row, entries in zip(x @ WEIGHT, ranked, strict=True):
        assert [int(e.decode().split(":")[1]) for e in entries] == list(np.argsort(-row)[:2])


def test_statistics_count_requests(client) -> None:
    before = client.get_inference_statistics("digits_dense").model_stats[0]
    x = np.zeros((1, 1, 10, 10), np.float32)
    for _ in range(3):
        client.infer("digits_dense", [digits_input(x)])
    after = client.get_inference_statistics("digits_dense").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 3
    assert after.inference_count == before.inference_count + 3
    # Triton's perf_analyzer refuses statistics whose three compute counts differ.
    stats = after.inference_stats
    assert stats.compute_input.count == stats.compute_infer.count == stats.compute_output.count
    assert stats.compute_infer.count == before.inference_stats.compute_infer.count + 3
    assert stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    for batch in after.batch_stats:
        assert batch.compute_input.count == batch.compute_infer.count > 0
        assert batch.compute_output.count == batch.compute_infer.count
    everything = client.get_inference_statistics("")
    assert {s.name for s in everything.model_stats} >= {"digits", "digits_dense", "slow"}


def test_repository_index(client) -> None:
    index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
    assert ("digits", "1", "READY") in index and ("digits_dense", "1", "READY") in index


def test_typed_contents_and_requested_outputs(server) -> None:
    import grpc

    x = np.random.default_rng(4).standard_normal((2, 1, 8, 8)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 8, 8])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in reply.outputs] == ["logits"] and list(reply.outputs[0].shape) == [2, 10]
    typed = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 10)
    with triton.InferenceServerClient(server.grpc_address) as c:
        raw = c.infer("digits", [digits_input(x)]).as_numpy("logits")
    np.testing.assert_allclose(typed, raw, atol=1e-5)


def test_an_error_in_a_batch_reaches_all_of_it_and_the_next_batch_runs(client) -> None:
    good = np.array([[1, 2, 3, 4]], np.float32)
    bad = np.array([[1, 2, 3, 99]], np.float32)
    outcomes: list[object] = []
    done = threading.Event()

    def callback(result, error) -> None:
        outcomes.append(error if error else result.as_numpy("value"))
        if len(outcomes) == 4:
            done.set()

    for x in (good, good, bad, good):  # one 300 ms window: one batch of four
        tensor = triton.InferInput("index", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        client.async_infer("gather", [tensor], callback=callback)
    assert done.wait(30)
    assert all(isinstance(o, InferenceServerException) for o in outcomes), outcomes
    assert all("inference failed inside the runtime" in o.message() for o in outcomes)
    tensor = triton.InferInput("index", [1, 4], "FP32")
    tensor.set_data_from_numpy(good)
    np.testing.assert_array_equal(
        client.infer("gather", [tensor]).as_numpy("value"), [[10, 20, 30, 40]]
    )
