"""convserve.v1.Classifier against a real server: images in, labels and checked maps out."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export.demo import digits_split
from export.model_entry import ExportSpec, export_entry
from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from tests.apart import run_apart


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def padded_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    ).eval()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    export_entry(
        padded_net(),
        ExportSpec(source="tests:padded", input_shape=(1, 8, 8), name="padded", repository=root),
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path):
    with ServerProcess(
        repository,
        "--max-image-bytes",
        "200000",
        "--max-image-pixels",
        "1000000",
        "--max-request-pixels",
        "3000000",
        "--max-map-cells",
        "5000",
        "--max-dense-copies",
        "16",
    ) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def held_out():
    _xt, x_test, _yt, y_test = digits_split()
    return x_test, y_test


def probabilities(reply_map: pb.ScoreMap) -> np.ndarray:
    return np.frombuffer(reply_map.fp32_probabilities, np.float32).reshape(tuple(reply_map.shape))


def classify_all(stub, images: list[np.ndarray]) -> np.ndarray:
    """Full probability vectors ([N, 10]) from Classify, one image per row."""
    reply = stub.Classify(
        pb.ClassifyRequest(
            model="digits", top_k=10, images=[pb.Image(encoded=png(image)) for image in images]
        )
    )
    out = np.zeros((len(images), 10), np.float32)
    for row, result in enumerate(reply.results):
        for entry in result.top:
            out[row, entry.index] = entry.probability
    return out


def test_classify_held_out_digits(stub, held_out) -> None:
    x_test, y_test = held_out
    reply = stub.Classify(
        pb.ClassifyRequest(
            model="digits", top_k=3, images=[pb.Image(encoded=png(x)) for x in x_test[:32]]
        )
    )
    assert reply.model == "digits" and reply.version == "1" and len(reply.results) == 32
    predicted = np.array([r.top[0].index for r in reply.results])
    assert np.mean(predicted == y_test[:32]) >= 0.95
    assert all(r.top[0].label == str(r.top[0].index) for r in reply.results)
    assert all(
        len(r.top) == 3 and r.top[0].probability >= r.top[1].probability for r in reply.results
    )


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_other_formats_and_resizing(stub, held_out, fmt: str) -> None:
    x_test, y_test = held_out
    big = np.kron(x_test[0], np.ones((4, 4), np.uint8))  # 32x32: resized to the 8x8 window
    reply = stub.Classify(
        pb.ClassifyRequest(
            model="digits", images=[pb.Image(encoded=png(big if fmt != "JPEG" else x_test[0], fmt))]
        )
    )
    assert reply.results[0].top[0].index == y_test[0]


def test_model_may_be_omitted_when_one_is_served(held_out) -> None:
    x_test, y_test = held_out
    with (
        ServerProcess(BUNDLED_REPOSITORY) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=png(x_test[1]))])
        )
        assert reply.model == "digits" and reply.results[0].top[0].index == y_test[1]


def test_tensor_input_equals_encoded(stub, held_out) -> None:
    x_test, _y = held_out
    from onnx import load

    meta = {
        p.key: json.loads(p.value)
        for p in load(str(BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx")).metadata_props
    }
    pre = meta["convserve.preprocess"]
    tensor = (x_test[5].astype(np.float32) * pre["scale"] - pre["mean"][0]) / pre["std"][0]
    tensor = tensor[None].astype(np.float32)
    reply = stub.Classify(
        pb.ClassifyRequest(
            model="digits",
            top_k=10,
            images=[pb.Image(tensor=pb.Tensor(shape=[1, 8, 8], fp32_data=tensor.tobytes()))],
        )
    )
    by_tensor = {e.index: e.probability for e in reply.results[0].top}
    by_png = classify_all(stub, [x_test[5]])[0]
    for index, probability in by_tensor.items():
        assert probability == pytest.approx(by_png[index], abs=1e-5)


def test_every_dense_cell_equals_classify_on_its_crop(stub) -> None:
    image = np.random.default_rng(0).integers(0, 256, (14, 23), dtype=np.uint8)
    reply = stub.ClassifyDense(
        pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(image)))
    )
    grid = probabilities(reply.map)
    assert grid.shape == (10, 4, 8)  # (14-8)//2+1, (23-8)//2+1
    assert reply.geometry.exact and list(reply.geometry.stride) == [2, 2]
    starts = [list(axis.starts) for axis in reply.map.cell_starts]
    assert starts == [[0, 2, 4, 6], [0, 2, 4, 6, 8, 10, 12, 14]]
    crops = [image[y : y + 8, x : x + 8] for y in starts[0] for x in starts[1]]
    expected = classify_all(stub, crops).T.reshape(10, 4, 8)
    assert float(np.abs(grid - expected).max()) < 1e-4


# The larger sizes are copied or cropped on a decoding thread, the smaller on the event loop.
@pytest.mark.parametrize("size", [(13, 17), (41, 57)])
def test_stride_divisor_two_equals_crops_at_half_the_stride(stub, size) -> None:
    image = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    reply = stub.ClassifyDense(
        pb.ClassifyDenseRequest(
            model="digits", image=pb.Image(encoded=png(image)), stride_divisor=2
        )
    )
    grid = probabilities(reply.map)
    rows, columns = size[0] - 7, size[1] - 7  # (13-8)*2//2+1, (17-8)*2//2+1
    assert grid.shape == (10, rows, columns)
    assert list(reply.geometry.stride) == [1, 1]
    crops = [image[y : y + 8, x : x + 8] for y in range(rows) for x in range(columns)]
    expected = classify_all(stub, crops).T.reshape(10, rows, columns)
    assert float(np.abs(grid - expected).max()) < 1e-4


@pytest.mark.parametrize("size", [(12, 20), (70, 80)])
def test_crops_mode_equals_the_dense_pass_for_a_padding_free_model(stub, size) -> None:
    image = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    request = pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(image)))
    by_dense = stub.ClassifyDense(request)
    request.mode = pb.MODE_CROPS
    by_crops = stub.ClassifyDense(request)
    assert by_crops.mode == pb.MODE_CROPS and by_crops.geometry.exact
    assert float(np.abs(probabilities(by_dense.map) - probabilities(by_crops.map)).max()) < 1e-4


def test_strip_of_held_out_digits(stub, held_out) -> None:
    x_test, y_test = held_out
    digits = (3, 1, 4, 0, 9, 2, 6)
    picks = [int(np.flatnonzero(y_test == d)[5]) for d in digits]
    strip = np.concatenate([x_test[i] for i in picks], axis=1)
    reply = stub.ClassifyDense(
        pb.ClassifyDenseRequest(model="digits", top_k=10, image=pb.Image(encoded=png(strip)))
    )
    grid = probabilities(reply.map)[:, 0, :]  # [10, 25]
    for k, digit in enumerate(digits):
        segment = grid[:, 4 * k - 1 if k else 0 : 4 * k + 2]  # cells whose window is mostly it
        assert np.unravel_index(segment.argmax(), segment.shape)[0] == digit
    assert {e.index for e in reply.top[:7]} == set(digits)


def test_padded_network_reports_its_deviation(stub, repository: Path) -> None:
    image = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    request = pb.ClassifyDenseRequest(model="padded", image=pb.Image(encoded=png(image)))
    reply = stub.ClassifyDense(request)
    assert not reply.geometry.exact and reply.geometry.max_abs_dev > 0
    request.mode = pb.MODE_CROPS
    by_crops = stub.ClassifyDense(request)
    assert by_crops.geometry.exact
    # The claim behind "not exact": the dense map really differs from crop-by-crop here (zero
    # padding sees the neighbours' pixels), yet it is the same map, not another one.
    deviation = np.abs(probabilities(reply.map) - probabilities(by_crops.map))
    assert 1e-4 < deviation.max() < 0.5
    # and what the reply reports is what the export measured and recorded in the file
    model = onnx.load(str(repository / "padded" / "1" / "model.dense.onnx"))
    recorded = json.loads({p.key: p.value for p in model.metadata_props}["convserve.dense"])
    assert reply.geometry.max_abs_dev == pytest.approx(recorded["max_abs_dev"], rel=1e-6)
    assert reply.geometry.top1_agreement == pytest.approx(recorded["top1_agreement"], rel=1e-6)


def test_scales_labels_only_and_max_pool(stub) -> None:
    image = np.random.default_rng(4).integers(0, 256, (16, 24), dtype=np.uint8)
    reply = stub.ClassifyDense(
        pb.ClassifyDenseRequest(
            model="digits",
            image=pb.Image(encoded=png(image)),
            scales=[1.0, 0.5],
            pool=pb.POOL_MAX,
            return_map=False,
        )
    )
    assert not reply.HasField("map") and reply.pool == pb.POOL_MAX
    assert reply.cells == 5 * 9 + 1 * 3  # 16x24 and 8x12
    assert list(reply.scales) == [1.0, 0.5] and len(reply.top) == 5


def test_list_models(stub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"digits", "padded"}
    digits = models["digits"]
    assert (digits.version, digits.labels, list(digits.window), digits.channels, digits.dense) == (
        "1",
        10,
        [8, 8],
        1,
        True,
    )
    assert list(digits.geometry.stride) == [2, 2] and digits.geometry.exact


@pytest.mark.parametrize(
    ("request_factory", "code", "pattern"),
    [
        (
            lambda: pb.ClassifyRequest(
                model="digits", images=[pb.Image(encoded=b"\x89PNG\r\n\x1a\n" + b"x" * 50)]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"image header is corrupt or truncated",
        ),
        (
            lambda: pb.ClassifyRequest(
                model="digits",
                images=[
                    pb.Image(
                        encoded=png(
                            np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
                        )[:800]
                    )
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"PNG image is corrupt or truncated",
        ),
        (
            lambda: pb.ClassifyRequest(
                model="digits", images=[pb.Image(encoded=png(np.zeros((8, 8), np.uint8), "GIF"))]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"not a readable JPEG, PNG, WEBP, BMP file",
        ),
        (
            lambda: pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"image is empty",
        ),
        (
            lambda: pb.ClassifyRequest(model="digits", images=[pb.Image()]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"image has neither encoded bytes nor a tensor",
        ),
        (
            lambda: pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"x" * 200001)]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"image is 200001 bytes; the server accepts at "
            r"most 200000",
        ),
        (
            lambda: pb.ClassifyRequest(
                model="digits", images=[pb.Image(encoded=png(np.zeros((1001, 1000), np.uint8)))]
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"image is 1000x1001 = 1001000 pixels; the server "
            r"accepts at most 1000000",
        ),
        (  # each image within its limit, together over the request's: refused undecoded
            lambda: pb.ClassifyRequest(
                model="digits",
                images=[pb.Image(encoded=png(np.zeros((1000, 1000), np.uint8)))] * 4,
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"the 4 images hold 4000000 pixels together; the server decodes at most 3000000 per "
            r"request: send fewer images at a time",
        ),
        (
            lambda: pb.ClassifyRequest(model="nope", images=[pb.Image(encoded=b"x")]),
            grpc.StatusCode.NOT_FOUND,
            r"model 'nope' is not served",
        ),
        (
            lambda: pb.ClassifyRequest(model="digits_dense", images=[pb.Image(encoded=b"x")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"use the logical model name 'digits'",
        ),
        (
            lambda: pb.ClassifyRequest(model="digits"),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"no images in the request",
        ),
        (
            lambda: pb.ClassifyRequest(
                model="digits",
                images=[pb.Image(tensor=pb.Tensor(shape=[1, 8, 8], fp32_data=b"\x00" * 12))],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"raw contents hold 12 bytes; shape \[1, 8, 8\]",
        ),
        (
            lambda: pb.ClassifyRequest(
                model="digits",
                images=[pb.Image(tensor=pb.Tensor(shape=[1, 9, 8], fp32_data=b"\x00" * 288))],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"tensor shape \[1, 9, 8\] does not match the "
            r"model's input \[1, 8, 8\]",
        ),
        (
            lambda: pb.ClassifyRequest(
                model="digits",
                images=[
                    pb.Image(tensor=pb.Tensor(shape=[1, 8, 8], fp32_data=b"\x00" * 256)),
                    pb.Image(tensor=pb.Tensor(shape=[2, 8, 8], fp32_data=b"\x00" * 512)),
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"image 1 is \[2, 8, 8\] but image 0 is \[1, 8, 8\]; the images of one request "
            r"must share a shape",
        ),
    ],
)
def test_classify_bad_input(stub, request_factory, code, pattern) -> None:
    import re

    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(request_factory())
    assert error.value.code() == code, error.value.details()
    assert re.search(pattern, error.value.details()), error.value.details()
    assert stub.Classify(
        pb.ClassifyRequest(
            model="digits", images=[pb.Image(encoded=png(np.zeros((8, 8), np.uint8)))]
        )
    ).results


@pytest.mark.parametrize(
    ("size", "options", "code", "pattern"),
    [
        (
            (6, 20),
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"image 20x6 \(at scale 1\) is smaller than the model's window 8x8",
        ),
        (
            (200, 200),
            {},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"asks for 9409 cells; the server computes at most 5000",
        ),
        (
            (16, 16),
            {"stride_divisor": 2, "scales": [1.0, 1.2, 1.4, 1.6, 2.0]},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"20 shifted and scaled copies requested; the "
            r"server evaluates at most 16",
        ),
        (
            (16, 16),
            {"stride_divisor": 9},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"stride_divisor must be 1..8, got 9",
        ),
        (
            (16, 16),
            {"stride_divisor": 3},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"stride \[2, 2\] is not divisible by stride_divisor 3",
        ),
        (
            (16, 16),
            {"scales": [5.0]},
            grpc.StatusCode.INVALID_ARGUMENT,
            r"scales must each be in \(0, 4\]",
        ),
    ],
)
def test_dense_limits_before_work(stub, size, options, code, pattern) -> None:
    import re

    image = np.zeros(size, np.uint8)
    with pytest.raises(grpc.RpcError) as error:
        stub.ClassifyDense(
            pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(image)), **options)
        )
    assert error.value.code() == code, error.value.details()
    assert re.search(pattern, error.value.details()), error.value.details()


def test_dense_pass_pixels_are_bounded_and_crops_are_not(repository: Path) -> None:
    """The dense pass's activations grow with its pixels; crops go through in batches."""
    image = pb.Image(encoded=png(np.zeros((100, 100), np.uint8)))
    with (
        ServerProcess(repository, "--max-dense-pixels", "30000") as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyDenseRequest(model="digits", image=image)
        assert stub.ClassifyDense(request).cells == 47 * 47  # 10,000 pixels
        request.stride_divisor = 2  # four shifted copies: 40,000
        with pytest.raises(grpc.RpcError) as error:
            stub.ClassifyDense(request)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.value.details() == (
            "the dense pass would take 40000 pixels (every scale and shifted copy); the server "
            "takes at most 30000: send a smaller image or fewer copies, or use mode=crops"
        )
        request.mode = pb.MODE_CROPS
        assert stub.ClassifyDense(request).cells == 93 * 93


def test_dense_input_elements_are_bounded_before_any_resizing(repository: Path) -> None:
    """Copies (dense) and crops (crops mode) count against max_tensor_elements, up front."""
    image = pb.Image(encoded=png(np.zeros((100, 100), np.uint8)))  # 47 x 47 cells

    def ask(stub: pb_grpc.ClassifierStub, **options: object) -> pb.ClassifyDenseResponse:
        return stub.ClassifyDense(pb.ClassifyDenseRequest(model="digits", image=image, **options))

    with (
        ServerProcess(repository, "--max-tensor-elements", "20000") as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        assert ask(stub).cells == 47 * 47  # one copy of 100 x 100: 10,000 elements
        refusals = [
            (
                {"mode": pb.MODE_CROPS},  # 2,209 crops of 8 x 8
                r"needs 141376 input elements \(crops mode",
            ),
            ({"stride_divisor": 2}, r"needs 40000 input elements \(dense mode"),
        ]
        for options, pattern in refusals:
            with pytest.raises(grpc.RpcError) as error:
                ask(stub, **options)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.search(pattern, error.value.details()), error.value.details()
            assert "at most 20000 (max_tensor_elements)" in error.value.details()


def test_a_request_of_many_chunks_fits_a_small_queue(repository: Path, held_out) -> None:
    """2,209 crops are 70 chunks of 32; a queue of 8 takes them because they go 4 at a time."""
    x_test, _ = held_out
    strip = np.zeros((100, 100), np.uint8)
    strip[40:48, 40:48] = x_test[3]
    request = pb.ClassifyDenseRequest(
        model="digits", image=pb.Image(encoded=png(strip)), mode=pb.MODE_CROPS, return_map=True
    )
    with (
        ServerProcess(
            repository, "--inline-compute-microseconds", "0", "--max-queue-size", "8"
        ) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        by_crops = stub.ClassifyDense(request)
        request.mode = pb.MODE_DENSE
        by_dense = stub.ClassifyDense(request)
        # three scales at once share the request's 4 places in the queue
        request.mode = pb.MODE_CROPS
        request.scales[:] = [1.0, 0.9, 0.8]
        scaled = stub.ClassifyDense(request)
    assert scaled.cells == 47 * 47 + 42 * 42 + 37 * 37
    assert by_crops.cells == 47 * 47
    np.testing.assert_allclose(
        np.frombuffer(by_crops.map.fp32_probabilities, np.float32),
        np.frombuffer(by_dense.map.fp32_probabilities, np.float32),
        atol=1e-4,
    )


def test_client_commands(server: ServerProcess, held_out, tmp_path: Path) -> None:
    x_test, y_test = held_out
    one = tmp_path / "one.png"
    one.write_bytes(png(x_test[7]))
    strip = tmp_path / "strip.png"
    strip.write_bytes(png(np.concatenate([x_test[i] for i in range(5)], axis=1)))

    def convserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", *args, "--server", server.grpc_address],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    result = convserve("classify", str(one), "--model", "digits", "--json")
    assert result.returncode == 0, result.stderr
    [document] = json.loads(result.stdout)
    assert document["image"] == str(one) and document["model"] == "digits"
    assert document["top"][0]["index"] == y_test[7]
    assert set(document["top"][0]) == {"label", "index", "probability"}

    heatmap = tmp_path / "heat.png"
    result = convserve(
        "classify", str(strip), "--model", "digits", "--dense", "--json", "--heatmap", str(heatmap)
    )
    assert result.returncode == 0, result.stderr
    [document] = json.loads(result.stdout)
    assert document["map_shape"] == [10, 1, 17] and document["stride"] == [2, 2]
    assert document["window"] == [8, 8] and document["exact"] is True
    assert set(document) == {
        "image",
        "model",
        "version",
        "mode",
        "map_shape",
        "stride",
        "window",
        "offset",
        "exact",
        "pool",
        "top",
    }
    assert set(document["top"][0]) == {"label", "index", "probability", "best_cell", "box"}
    assert Image.open(heatmap).size == (40, 8) and f"heat-map of {strip}" in result.stderr

    result = convserve("models", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert models["digits"] == {
        "name": "digits",
        "version": "1",
        "channels": 1,
        "window": [8, 8],
        "labels": 10,
        "dense": True,
        "stride": [2, 2],
        "exact": True,
    }
    table = convserve("models")
    assert "digits" in table.stdout and "padded" in table.stdout

    failed = convserve("classify", str(one), "--model", "nope")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "error: NOT_FOUND: model 'nope' is not served" in failed.stderr


def test_dense_tensor_input_takes_no_other_scales(stub) -> None:
    tensor = pb.Tensor(shape=[1, 12, 12], fp32_data=np.zeros((1, 12, 12), np.float32).tobytes())
    reply = stub.ClassifyDense(
        pb.ClassifyDenseRequest(model="digits", image=pb.Image(tensor=tensor))
    )
    assert list(reply.map.shape) == [10, 3, 3]
    with pytest.raises(grpc.RpcError) as error:
        stub.ClassifyDense(
            pb.ClassifyDenseRequest(
                model="digits", image=pb.Image(tensor=tensor), scales=[1.0, 0.5]
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scales other than 1 need an encoded image" in error.value.details()


@pytest.mark.parametrize("mode", [pb.MODE_DENSE, pb.MODE_CROPS])
def test_dense_tensor_input_with_other_channels_is_refused_before_any_work(stub, mode) -> None:
    # The limits are checked against the model's one channel: 15 would be 15 times the work.
    tensor = pb.Tensor(shape=[15, 12, 12], fp32_data=bytes(4 * 15 * 12 * 12))
    with pytest.raises(grpc.RpcError) as error:
        stub.ClassifyDense(
            pb.ClassifyDenseRequest(model="digits", image=pb.Image(tensor=tensor), mode=mode)
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor shape [15, 12, 12] has 15 channels; model 'digits' takes 1" in (
        error.value.details()
    )


INLINE_CHECK = """
import asyncio, io, json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from service import BUNDLED_REPOSITORY
from service.classification.classifier import INLINE_PIXELS, Classification, ImageInput
from service.core.errors import InvalidArgument
from service.engine.dataplane import DataPlane, Outcome
from service.engine.repository import ModelRepository
from service.engine.runtime import DeviceChoice
from service.core.settings import Settings


class CountingExecutor(ThreadPoolExecutor):  # a real thread pool that counts its work
    submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def health(name, serving):
    return None


async def main():
    settings = Settings()
    report = {}
    with CountingExecutor(2) as decoders, ThreadPoolExecutor(2) as loads:
        repository = ModelRepository(
            BUNDLED_REPOSITORY, settings, DeviceChoice("cpu"), loads, health
        )
        await repository.load_all()
        classification = Classification(DataPlane(repository), settings, decoders)
        rng = np.random.default_rng(3)
        tiny = png(rng.integers(0, 256, (8, 8), dtype=np.uint8))
        side = int(INLINE_PIXELS**0.5) + 8  # just over the limit
        large = png(rng.integers(0, 256, (side, side), dtype=np.uint8))

        async def top(images):
            _model, found = await classification.classify(
                "digits", "", [ImageInput(encoded=i) for i in images], 3, None, Outcome()
            )
            return [[(t.label, t.probability) for t in per_image] for per_image in found]

        on_loop = await top([tiny])
        report["after_tiny"] = decoders.submitted
        mixed = await top([large, tiny, large])
        report["after_mixed"] = decoders.submitted
        report["same_answer"] = mixed[1] == on_loop[0] and mixed[0] == mixed[2]
        try:
            await top([b"\\x89PNG\\r\\n\\x1a\\n broken"])
        except InvalidArgument as exc:
            report["broken"] = exc.message
        await repository.close()
    print(json.dumps(report))


asyncio.run(main())
"""


def test_tiny_images_decode_on_the_loop_and_large_ones_on_decoding_threads() -> None:
    # A process of its own: the data plane's KServe stubs and tritonclient's cannot share one.
    report = run_apart(INLINE_CHECK)
    assert report["after_tiny"] == 0  # decoded on the loop: the hop would cost more
    assert report["after_mixed"] == 2  # only the two large images went to the threads
    assert report["same_answer"]  # wherever an image was decoded, the answer is the same
    # A header that cannot be read says nothing of the size: the thread reports it as ever.
    assert "not a readable" in report["broken"]


def _samples(server: ServerProcess, name: str, model: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("model") == model
    ]


def _ready_versions(server: ServerProcess, model: str) -> set[str]:
    return {
        labels["version"]
        for labels, value in _samples(server, "convserve_model_ready", model)
        if value == 1
    }


def _batches(server: ServerProcess, model: str) -> float:
    return sum(value for _, value in _samples(server, "convserve_batch_size_count", model))


def test_a_reload_in_the_middle_of_a_classify_lets_all_its_chunks_run(tmp_path: Path) -> None:
    """A Classify of 256 chunks of a slow model, 4 at a time; version 2 is swapped in meanwhile.

    The chunks queued after the swap still go to version 1, which closes only once the request
    that held it is done (before, they met a closed batcher: UNAVAILABLE); the load itself
    returns as soon as version 2 serves, without waiting for that request.
    """
    # tritonclient's KServe stubs: ours and its cannot share one process (the same proto file).
    import tritonclient.grpc as triton

    from tests import onnx_models

    path = onnx_models.slow(tmp_path / "slow" / "1", depth=64, config={"max_batch_size": 4})
    rows = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    request = pb.ClassifyRequest(
        model="slow",
        top_k=1,
        images=[pb.Image(tensor=pb.Tensor(shape=[1024], fp32_data=row.tobytes())) for row in rows],
    )
    with (
        ServerProcess(tmp_path) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
        triton.InferenceServerClient(server.grpc_address) as control,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        classify = pool.submit(stub.Classify, request, timeout=120)
        give_up = time.monotonic() + 60
        while _batches(server, "slow") < 2 and time.monotonic() < give_up:
            time.sleep(0.005)
        shutil.copytree(tmp_path / "slow" / "1", tmp_path / "slow" / "2")
        loading = pool.submit(control.load_model, "slow", client_timeout=120)
        while "2" not in _ready_versions(server, "slow") and time.monotonic() < give_up:
            time.sleep(0.005)
        early = classify.done()
        loading.result()  # returns once version 2 serves; version 1 drains in the background
        loaded_first = not classify.done()
        # A further load waits for that drain: no third generation while the first still holds.
        control.load_model("slow", client_timeout=120)
        assert classify.done()
        reply = classify.result()
        assert not early, "the Classify ended before the swap: the test tests nothing"
        assert loaded_first, "the load waited for the Classify holding version 1"
        assert _ready_versions(server, "slow") == {"2"}
        assert reply.version == "1"
        server.log_with("drained slow version 1")
    # Every image answered, in order (first and last chunks checked against ONNX Runtime).
    assert len(reply.results) == len(rows)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ends = np.concatenate([rows[:8], rows[-8:]])
    (scores,) = session.run(None, {"x": ends})
    top = [r.top[0].index for r in [*reply.results[:8], *reply.results[-8:]]]
    assert top == scores.argmax(axis=1).tolist()


def test_many_small_images_are_refused_by_the_input_elements_they_would_become() -> None:
    """Every image becomes a window-sized tensor, however few bytes or pixels it has."""
    dot = png(np.zeros((1, 1), np.uint8))  # ~70 bytes that would become 64 input elements
    tensor = pb.Image(tensor=pb.Tensor(shape=[1, 8, 8], fp32_data=bytes(4 * 64)))
    with (
        ServerProcess(BUNDLED_REPOSITORY, "--max-tensor-elements", "1000") as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        stub = pb_grpc.ClassifierStub(channel)
        for images in ([pb.Image(encoded=dot)] * 16, [tensor] * 15 + [pb.Image(encoded=dot)]):
            with pytest.raises(grpc.RpcError) as error:
                stub.Classify(pb.ClassifyRequest(model="digits", images=images))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.search(
                r"the 16 images make 1024 input elements; the server accepts at most 1000 per "
                r"request",
                error.value.details(),
            )
        reply = stub.Classify(
            pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=dot)] * 15)
        )
        assert len(reply.results) == 15


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("pool", "pool 7 is not one of POOL_MEAN (0), POOL_MAX (1)"),
        ("mode", "mode 7 is not one of MODE_DENSE (0), MODE_CROPS (1)"),
    ],
)
def test_dense_enum_values_the_proto_does_not_define_are_refused(stub, field, expected) -> None:
    request = pb.ClassifyDenseRequest(
        model="digits", image=pb.Image(encoded=png(np.zeros((12, 12), np.uint8)))
    )
    setattr(request, field, 7)  # what a newer client's value reads as here
    with pytest.raises(grpc.RpcError) as error:
        stub.ClassifyDense(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == expected
