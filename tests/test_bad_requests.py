"""Bad requests get a clear status and message, and never hurt the next request.

Names, versions, parameters, requested outputs, unparsable messages and log lines; the tensors
themselves are test_bad_input.py's. The cases shared with the REST port are in
tests/bad_inference_cases.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from tests.bad_inference_cases import REQUEST_CASES, Case
from tests.limited_server import assert_status, kserve_stub, limited_server, request


@pytest.fixture(scope="module")
def server():
    with limited_server() as process:
        yield process


@pytest.fixture(scope="module")
def stub(server):
    with kserve_stub(server) as client:
        yield client


@pytest.mark.parametrize("case", REQUEST_CASES, ids=lambda case: case.name)
def test_bad_requests(stub, case: Case) -> None:
    assert_status(stub, case.build(), case.code, case.pattern)


def test_oversized_message(stub) -> None:
    shape = (4, 1, 256, 256)  # 1 MiB of float32 plus headers: above --max-message-bytes
    data = np.zeros(shape, np.float32).tobytes()
    assert_status(
        stub,
        request(model="digits_dense", shape=shape, data=data),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        r"(?i)received message larger than max",
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
    # Left to grpc, it would be UNKNOWN "Unexpected <class 'google.protobuf...DecodeError'>".
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
