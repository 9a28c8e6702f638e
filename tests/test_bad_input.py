"""Bad input gets a clear status and message, and never hurts the next request: tensors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from tests.limited_server import assert_status, kserve_stub, limited_server, request


@pytest.fixture(scope="module")
def server():
    with limited_server() as process:
        yield process


@pytest.fixture(scope="module")
def stub(server):
    with kserve_stub(server) as client:
        yield client


def test_unknown_model(stub) -> None:
    assert_status(
        stub, request(model="nope"), grpc.StatusCode.NOT_FOUND, r"model 'nope' is not served"
    )


def test_unknown_version(stub) -> None:
    message = request()
    message.model_version = "7"
    assert_status(
        stub, message, grpc.StatusCode.NOT_FOUND, r"model 'digits' version '7' is not served"
    )


def test_wrong_datatype(stub) -> None:
    data = np.zeros((1, 1, 8, 8), np.float64).tobytes()
    assert_status(
        stub,
        request(datatype="FP64", data=data),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'input': datatype FP64 does not match the model's FP32",
    )


def test_unsupported_datatype(stub) -> None:
    assert_status(
        stub,
        request(datatype="COMPLEX"),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"datatype 'COMPLEX' is not supported",
    )


def test_wrong_shape(stub) -> None:
    shape = (1, 1, 8, 9)
    assert_status(
        stub,
        request(shape=shape, data=np.zeros(shape, np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"shape \[1, 1, 8, 9\] does not match the model's \[-1, 1, 8, 8\] at "
        r"dimension 3",
    )


def test_wrong_rank(stub) -> None:
    shape = (1, 64)
    assert_status(
        stub,
        request(shape=shape, data=np.zeros(shape, np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"has rank 2; the model expects rank 4",
    )


def test_raw_byte_length(stub) -> None:
    assert_status(
        stub,
        request(data=b"\x00" * 100),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"raw contents hold 100 bytes; shape \[1, 1, 8, 8\] of FP32 needs 256",
    )


def test_missing_input(stub) -> None:
    message = service_pb2.ModelInferRequest(model_name="digits")
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'input' is missing; model 'digits' takes inputs \['input'\]",
    )


def test_extra_input(stub) -> None:
    message = request()
    message.inputs.add(name="mask", datatype="FP32", shape=[1])
    message.raw_input_contents.append(b"\x00" * 4)
    assert_status(stub, message, grpc.StatusCode.INVALID_ARGUMENT, r"input 'mask' is unknown")


def test_raw_count_must_match_inputs(stub) -> None:
    message = request()
    message.raw_input_contents.append(b"")
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"raw_input_contents has 2 entries for 1 inputs",
    )


def test_both_raw_and_typed(stub) -> None:
    message = request()
    message.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"both raw_input_contents and contents are set",
    )


def test_typed_count(stub) -> None:
    message = service_pb2.ModelInferRequest(model_name="digits")
    tensor = message.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    tensor.contents.fp32_contents.extend([0.0] * 63)
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"fp32_contents holds 63 values; shape \[1, 1, 8, 8\] needs 64",
    )


def test_batch_above_max(stub) -> None:
    shape = (33, 1, 8, 8)
    assert_status(
        stub,
        request(shape=shape, data=np.zeros(shape, np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"batch of 33 is outside 1..32 \(max_batch_size of model 'digits'\)",
    )


def test_negative_dimension(stub) -> None:
    assert_status(
        stub,
        request(shape=(1, 1, -8, 8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"shape \[1, 1, -8, 8\] has a negative dimension",
    )


def test_huge_claimed_shape_is_refused_before_allocation(stub) -> None:
    shape = (1, 1, 1 << 30, 1 << 30)  # 2**60 elements claimed, 256 bytes sent
    assert_status(
        stub,
        request(shape=shape),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        r"has 1152921504606846976 elements; the server accepts at most 100000",
    )


@pytest.mark.parametrize("typed", [False, True])
def test_a_zero_beside_huge_dimensions_is_refused_not_an_internal_error(stub, typed) -> None:
    message = request(shape=(0, 1 << 62, 1 << 62, 1), data=b"")
    if typed:  # no elements either way: numpy would refuse to shape them ("array is too big")
        del message.raw_input_contents[:]
        message.inputs[0].contents.SetInParent()
    assert_status(
        stub,
        message,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        r"shape \[0, 4611686018427387904, 4611686018427387904, 1\] has a dimension of "
        r"4611686018427387904; the server accepts at most 100000 elements per tensor",
    )


def test_a_rank_beyond_any_model_is_refused(stub) -> None:
    assert_status(
        stub,
        request(shape=(1,) * 70, data=bytes(4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'input': shape has 70 dimensions; the server accepts at most 32",
    )


def test_typed_values_in_a_second_field_are_refused_not_ignored(stub) -> None:
    message = request()
    del message.raw_input_contents[:]
    message.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    message.inputs[0].contents.int_contents.extend([7])
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'input': FP32 values go in fp32_contents, but int_contents is set",
    )


def test_a_request_naming_thousands_of_inputs_is_refused_at_once(stub) -> None:
    message = request()
    for number in range(300):
        message.inputs.add(name=f"extra{number}", datatype="FP32", shape=[1])
        message.raw_input_contents.append(bytes(4))
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"the request has 301 inputs; the server accepts at most 256",
    )
