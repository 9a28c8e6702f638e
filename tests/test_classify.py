"""Classify against a real server: labels of real digits, every input form, every refusal."""

from __future__ import annotations

import json
import re
import shutil

import grpc
import numpy as np
import pytest

from service import BUNDLED_REPOSITORY
from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from tests.classifier_server import classify_all, png


def test_classify_held_out_digits(classifier_stub, held_out) -> None:
    x_test, y_test = held_out
    reply = classifier_stub.Classify(
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
def test_other_formats_and_resizing(classifier_stub, held_out, fmt: str) -> None:
    x_test, y_test = held_out
    big = np.kron(x_test[0], np.ones((4, 4), np.uint8))  # 32x32: resized to the 8x8 window
    reply = classifier_stub.Classify(
        pb.ClassifyRequest(
            model="digits", images=[pb.Image(encoded=png(big if fmt != "JPEG" else x_test[0], fmt))]
        )
    )
    assert reply.results[0].top[0].index == y_test[0]


def test_model_may_be_omitted_when_one_is_served(held_out, tmp_path) -> None:
    x_test, y_test = held_out
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    with (
        ServerProcess(tmp_path) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
    ):
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=png(x_test[1]))])
        )
        assert reply.model == "digits" and reply.results[0].top[0].index == y_test[1]


def test_tensor_input_equals_encoded(classifier_stub, held_out) -> None:
    x_test, _y = held_out
    from onnx import load

    meta = {
        p.key: json.loads(p.value)
        for p in load(str(BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx")).metadata_props
    }
    pre = meta["convserve.preprocess"]
    tensor = (x_test[5].astype(np.float32) * pre["scale"] - pre["mean"][0]) / pre["std"][0]
    tensor = tensor[None].astype(np.float32)
    reply = classifier_stub.Classify(
        pb.ClassifyRequest(
            model="digits",
            top_k=10,
            images=[pb.Image(tensor=pb.Tensor(shape=[1, 8, 8], fp32_data=tensor.tobytes()))],
        )
    )
    by_tensor = {e.index: e.probability for e in reply.results[0].top}
    by_png = classify_all(classifier_stub, [x_test[5]])[0]
    for index, probability in by_tensor.items():
        assert probability == pytest.approx(by_png[index], abs=1e-5)


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
def test_classify_bad_input(classifier_stub, request_factory, code, pattern) -> None:
    import re

    with pytest.raises(grpc.RpcError) as error:
        classifier_stub.Classify(request_factory())
    assert error.value.code() == code, error.value.details()
    assert re.search(pattern, error.value.details()), error.value.details()
    assert classifier_stub.Classify(
        pb.ClassifyRequest(
            model="digits", images=[pb.Image(encoded=png(np.zeros((8, 8), np.uint8)))]
        )
    ).results


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
