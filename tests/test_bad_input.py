"""Bad input gets a clear status and message, and never hurts the next request."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess

MAX_MESSAGE = 1 << 20
MAX_ELEMENTS = 100_000


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        BUNDLED_REPOSITORY,
        "--max-message-bytes",
        str(MAX_MESSAGE),
        "--max-tensor-elements",
        str(MAX_ELEMENTS),
    ) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(
        server.grpc_address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(
    model: str = "digits",
    shape=(1, 1, 8, 8),
    datatype: str = "FP32",
    data: bytes | None = None,
    name: str = "input",
) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if data is None:
        data = np.zeros((1, 1, 8, 8), np.float32).tobytes()
    message.raw_input_contents.append(data)
    return message


def assert_status(stub, message, code: grpc.StatusCode, pattern: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(message)
    assert error.value.code() == code, error.value.details()
    assert re.search(pattern, error.value.details()), error.value.details()
    # ...and the server still answers a valid request correctly.
    reply = stub.ModelInfer(request())
    assert list(reply.outputs[0].shape) == [1, 10]
    assert np.isfinite(np.frombuffer(reply.raw_output_contents[0], np.float32)).all()


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


def test_a_version_longer_than_any_number_is_not_found(stub) -> None:
    message = request()
    message.model_version = "9" * 5000  # int() refuses more than 4300 digits
    assert_status(stub, message, grpc.StatusCode.NOT_FOUND, r"model 'digits' version '9999")


def test_a_message_quoting_a_huge_value_is_cut_so_the_client_still_gets_it(stub) -> None:
    # Whole, the message would pass gRPC's 16 KiB header limit: the client would be told
    # RESOURCE_EXHAUSTED about metadata instead of why its request was refused.
    message = request()
    message.outputs.add(name="x" * 100_000)
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^output 'x{1000,}\.\.\. \(\d+ more characters\)$",
    )


def test_oversized_message(stub) -> None:
    shape = (4, 1, 256, 256)  # 1 MiB of float32 plus headers: above --max-message-bytes
    data = np.zeros(shape, np.float32).tobytes()
    assert_status(
        stub,
        request(model="digits_dense", shape=shape, data=data),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        r"(?i)received message larger than max",
    )


def test_dense_input_smaller_than_window(stub) -> None:
    shape = (1, 1, 6, 20)
    assert_status(
        stub,
        request(model="digits_dense", shape=shape, data=np.zeros(shape, np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"spatial size \[6, 20\] is smaller than the model's window \[8, 8\]",
    )


def test_bad_timeout_parameter(stub) -> None:
    message = request()
    message.parameters["timeout"].string_param = "soon"
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"parameter 'timeout' must be a non-negative integer",
    )


def test_unknown_requested_output(stub) -> None:
    message = request()
    message.outputs.add(name="probabilities")
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"output 'probabilities' is unknown; model 'digits' has outputs \['logits'\]",
    )


@pytest.mark.parametrize(
    "version", ["latest", "\u00b2", "\u0661"]
)  # "²" and Arabic-Indic one are isdigit()
def test_non_numeric_version(stub, version: str) -> None:
    message = request()
    message.model_version = version
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"model version must be a positive integer, got '{version}'",
    )


def test_an_output_requested_twice(stub) -> None:
    message = request()
    message.outputs.add(name="logits")
    message.outputs.add(name="logits")
    assert_status(
        stub, message, grpc.StatusCode.INVALID_ARGUMENT, r"output 'logits' is requested twice"
    )


@pytest.mark.parametrize("tensor", ["input", "output"])
def test_shared_memory_regions_are_refused_by_name(stub, tensor: str) -> None:
    message = request()
    if tensor == "input":  # Triton's clients send no contents for a tensor in shared memory
        del message.raw_input_contents[:]
        target = message.inputs[0]
    else:
        target = message.outputs.add(name="logits")
    target.parameters["shared_memory_region"].string_param = "region0"
    target.parameters["shared_memory_byte_size"].int64_param = 256
    assert_status(
        stub,
        message,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{tensor} '(input|logits)' names a shared memory region; .*the shared memory "
        "extensions are not served",
    )


def test_model_ready_refuses_a_version_that_is_no_number(stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelReady(service_pb2.ModelReadyRequest(name="digits", version="abc"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model version must be a positive integer, got 'abc'" in error.value.details()
    assert stub.ModelReady(service_pb2.ModelReadyRequest(name="digits", version="1")).ready
    assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="digits", version="7")).ready
    assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="nope")).ready


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="other")),
        lambda s: s.RepositoryModelLoad(
            service_pb2.RepositoryModelLoadRequest(repository_name="other", model_name="digits")
        ),
        lambda s: s.RepositoryModelUnload(
            service_pb2.RepositoryModelUnloadRequest(repository_name="other", model_name="digits")
        ),
    ],
    ids=["index", "load", "unload"],
)
def test_a_named_repository_is_refused_not_ignored(stub, call) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call(stub)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repository_name 'other': this server serves one model repository" in (
        error.value.details()
    )
    assert stub.ModelReady(service_pb2.ModelReadyRequest(name="digits")).ready  # not unloaded


def test_refused_requests_count_as_failures_in_the_model_statistics(stub) -> None:
    def failures() -> int:
        reply = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="digits"))
        return int(reply.model_stats[0].inference_stats.fail.count)

    before = failures()
    for message in (request(shape=(1, 1, 8, 9), data=bytes(4 * 72)), request(data=b"\0" * 12)):
        with pytest.raises(grpc.RpcError) as error:  # refused by the model's checks; by decoding
            stub.ModelInfer(message)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failures() == before + 2


GARBAGE = b"\xff\xff\xff"  # no protobuf message parses from this


@pytest.mark.parametrize(
    "method",
    [
        "inference.GRPCInferenceService/ModelInfer",
        "inference.GRPCInferenceService/ModelReady",
        "convserve.v1.Classifier/Classify",
        "convserve.v1.Classifier/ClassifyDense",
    ],
)
def test_an_unparsable_message_is_invalid_argument_naming_the_method(server, stub, method) -> None:
    # Left to grpc it was UNKNOWN "Unexpected <class 'google.protobuf...DecodeError'>".
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.unary_unary(f"/{method}")
        with pytest.raises(grpc.RpcError) as error:
            call(GARBAGE, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    name = method.rsplit("/", 1)[1]
    assert error.value.details().startswith(f"the {name} request does not parse: Error parsing")
    assert stub.ModelReady(service_pb2.ModelReadyRequest(name="digits")).ready


def test_an_unparsable_stream_message_is_answered_in_band_and_the_stream_goes_on(
    server,
) -> None:
    messages = [request(), None, request(), request()]
    for number, message in enumerate(messages):
        if message is not None:
            message.id = str(number)
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        answers = list(
            call(iter([GARBAGE if m is None else m.SerializeToString() for m in messages]))
        )
    assert sorted(a.infer_response.id for a in answers) == ["", "0", "2", "3"]
    refused = [a for a in answers if a.error_message]
    assert len(refused) == 1 and refused[0].error_message.startswith(
        "the ModelStreamInfer request does not parse"
    )


def test_a_line_break_in_a_client_string_cannot_forge_a_log_line(server, stub) -> None:
    forged = "2026-01-01 00:00:00,000 ERROR service.forged: all is lost"
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(request(model=f"nope\n{forged}"))
    lines = server.log_with("service.forged").splitlines()  # the log line follows the reply
    assert any(f"model 'nope\\n{forged}' is not served" in line for line in lines)
    assert not any(line.startswith(forged) for line in lines)


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
