"""ClassifyDense against a real server: every cell checked against its crop, and its limits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from service._generated.convserve.v1 import classifier_pb2 as pb
from service._generated.convserve.v1 import classifier_pb2_grpc as pb_grpc
from service.tools.server_process import ServerProcess
from tests.classifier_server import classify_all, png, probabilities


def test_every_dense_cell_equals_classify_on_its_crop(classifier_stub) -> None:
    image = np.random.default_rng(0).integers(0, 256, (14, 23), dtype=np.uint8)
    reply = classifier_stub.ClassifyDense(
        pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(image)))
    )
    grid = probabilities(reply.map)
    assert grid.shape == (10, 4, 8)  # (14-8)//2+1, (23-8)//2+1
    assert reply.geometry.exact and list(reply.geometry.stride) == [2, 2]
    starts = [list(axis.starts) for axis in reply.map.cell_starts]
    assert starts == [[0, 2, 4, 6], [0, 2, 4, 6, 8, 10, 12, 14]]
    crops = [image[y : y + 8, x : x + 8] for y in starts[0] for x in starts[1]]
    expected = classify_all(classifier_stub, crops).T.reshape(10, 4, 8)
    assert float(np.abs(grid - expected).max()) < 1e-4


# The larger sizes are copied or cropped on a decoding thread, the smaller on the event loop.
@pytest.mark.parametrize("size", [(13, 17), (41, 57)])
def test_stride_divisor_two_equals_crops_at_half_the_stride(classifier_stub, size) -> None:
    image = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    reply = classifier_stub.ClassifyDense(
        pb.ClassifyDenseRequest(
            model="digits", image=pb.Image(encoded=png(image)), stride_divisor=2
        )
    )
    grid = probabilities(reply.map)
    rows, columns = size[0] - 7, size[1] - 7  # (13-8)*2//2+1, (17-8)*2//2+1
    assert grid.shape == (10, rows, columns)
    assert list(reply.geometry.stride) == [1, 1]
    crops = [image[y : y + 8, x : x + 8] for y in range(rows) for x in range(columns)]
    expected = classify_all(classifier_stub, crops).T.reshape(10, rows, columns)
    assert float(np.abs(grid - expected).max()) < 1e-4


@pytest.mark.parametrize("size", [(12, 20), (70, 80)])
def test_crops_mode_equals_the_dense_pass_for_a_padding_free_model(classifier_stub, size) -> None:
    image = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    request = pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(image)))
    by_dense = classifier_stub.ClassifyDense(request)
    request.mode = pb.MODE_CROPS
    by_crops = classifier_stub.ClassifyDense(request)
    assert by_crops.mode == pb.MODE_CROPS and by_crops.geometry.exact
    assert float(np.abs(probabilities(by_dense.map) - probabilities(by_crops.map)).max()) < 1e-4


def test_strip_of_held_out_digits(classifier_stub, held_out) -> None:
    x_test, y_test = held_out
    digits = (3, 1, 4, 0, 9, 2, 6)
    picks = [int(np.flatnonzero(y_test == d)[5]) for d in digits]
    strip = np.concatenate([x_test[i] for i in picks], axis=1)
    reply = classifier_stub.ClassifyDense(
        pb.ClassifyDenseRequest(model="digits", top_k=10, image=pb.Image(encoded=png(strip)))
    )
    grid = probabilities(reply.map)[:, 0, :]  # [10, 25]
    for k, digit in enumerate(digits):
        segment = grid[:, 4 * k - 1 if k else 0 : 4 * k + 2]  # cells whose window is mostly it
        assert np.unravel_index(segment.argmax(), segment.shape)[0] == digit
    assert {e.index for e in reply.top[:7]} == set(digits)


def test_padded_network_reports_its_deviation(classifier_stub, classifier_repository: Path) -> None:
    image = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    request = pb.ClassifyDenseRequest(model="padded", image=pb.Image(encoded=png(image)))
    reply = classifier_stub.ClassifyDense(request)
    assert not reply.geometry.exact and reply.geometry.max_abs_dev > 0
    request.mode = pb.MODE_CROPS
    by_crops = classifier_stub.ClassifyDense(request)
    assert by_crops.geometry.exact
    # The claim behind "not exact": the dense map really differs from crop-by-crop here (zero
    # padding sees the neighbours' pixels), yet it is the same map, not another one.
    deviation = np.abs(probabilities(reply.map) - probabilities(by_crops.map))
    assert 1e-4 < deviation.max() < 0.5
    # and what the reply reports is what the export measured and recorded in the file
    model = onnx.load(str(classifier_repository / "padded" / "1" / "model.dense.onnx"))
    recorded = json.loads({p.key: p.value for p in model.metadata_props}["convserve.dense"])
    assert reply.geometry.max_abs_dev == pytest.approx(recorded["max_abs_dev"], rel=1e-6)
    assert reply.geometry.top1_agreement == pytest.approx(recorded["top1_agreement"], rel=1e-6)


def test_scales_labels_only_and_max_pool(classifier_stub) -> None:
    image = np.random.default_rng(4).integers(0, 256, (16, 24), dtype=np.uint8)
    reply = classifier_stub.ClassifyDense(
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


def test_dense_tensor_input_takes_no_other_scales(classifier_stub) -> None:
    tensor = pb.Tensor(shape=[1, 12, 12], fp32_data=np.zeros((1, 12, 12), np.float32).tobytes())
    reply = classifier_stub.ClassifyDense(
        pb.ClassifyDenseRequest(model="digits", image=pb.Image(tensor=tensor))
    )
    assert list(reply.map.shape) == [10, 3, 3]
    with pytest.raises(grpc.RpcError) as error:
        classifier_stub.ClassifyDense(
            pb.ClassifyDenseRequest(
                model="digits", image=pb.Image(tensor=tensor), scales=[1.0, 0.5]
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scales other than 1 need an encoded image" in error.value.details()


@pytest.mark.parametrize("mode", [pb.MODE_DENSE, pb.MODE_CROPS])
def test_dense_tensor_input_with_other_channels_is_refused_before_any_work(
    classifier_stub, mode
) -> None:
    # The limits are checked against the model's one channel: 15 would be 15 times the work.
    tensor = pb.Tensor(shape=[15, 12, 12], fp32_data=bytes(4 * 15 * 12 * 12))
    with pytest.raises(grpc.RpcError) as error:
        classifier_stub.ClassifyDense(
            pb.ClassifyDenseRequest(model="digits", image=pb.Image(tensor=tensor), mode=mode)
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor shape [15, 12, 12] has 15 channels; model 'digits' takes 1" in (
        error.value.details()
    )


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("pool", "pool 7 is not one of POOL_MEAN (0), POOL_MAX (1)"),
        ("mode", "mode 7 is not one of MODE_DENSE (0), MODE_CROPS (1)"),
    ],
)
def test_dense_enum_values_the_proto_does_not_define_are_refused(
    classifier_stub, field, expected
) -> None:
    request = pb.ClassifyDenseRequest(
        model="digits", image=pb.Image(encoded=png(np.zeros((12, 12), np.uint8)))
    )
    setattr(request, field, 7)  # what a newer client's value reads as here
    with pytest.raises(grpc.RpcError) as error:
        classifier_stub.ClassifyDense(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == expected


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
def test_dense_limits_before_work(classifier_stub, size, options, code, pattern) -> None:
    import re

    image = np.zeros(size, np.uint8)
    with pytest.raises(grpc.RpcError) as error:
        classifier_stub.ClassifyDense(
            pb.ClassifyDenseRequest(model="digits", image=pb.Image(encoded=png(image)), **options)
        )
    assert error.value.code() == code, error.value.details()
    assert re.search(pattern, error.value.details()), error.value.details()


def test_dense_pass_pixels_are_bounded_and_crops_are_not(classifier_repository: Path) -> None:
    """The dense pass's activations grow with its pixels; crops go through in batches."""
    image = pb.Image(encoded=png(np.zeros((100, 100), np.uint8)))
    with (
        ServerProcess(classifier_repository, "--max-dense-pixels", "30000") as server,
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


def test_dense_input_elements_are_bounded_before_any_resizing(classifier_repository: Path) -> None:
    """Copies (dense) and crops (crops mode) count against max_tensor_elements, up front."""
    image = pb.Image(encoded=png(np.zeros((100, 100), np.uint8)))  # 47 x 47 cells

    def ask(stub: pb_grpc.ClassifierStub, **options: object) -> pb.ClassifyDenseResponse:
        return stub.ClassifyDense(pb.ClassifyDenseRequest(model="digits", image=image, **options))

    with (
        ServerProcess(classifier_repository, "--max-tensor-elements", "20000") as server,
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
