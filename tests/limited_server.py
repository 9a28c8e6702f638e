"""A server on the bundled repository with tight message and tensor limits, and requests to it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service import BUNDLED_REPOSITORY
from service.tools.server_process import ServerProcess

MAX_MESSAGE = 1 << 20
MAX_ELEMENTS = 100_000


@contextmanager
def limited_server() -> Iterator[ServerProcess]:
    """The bundled repository served with ``MAX_MESSAGE`` and ``MAX_ELEMENTS`` limits."""
    with ServerProcess(
        BUNDLED_REPOSITORY,
        "--max-message-bytes",
        str(MAX_MESSAGE),
        "--max-tensor-elements",
        str(MAX_ELEMENTS),
    ) as process:
        yield process


@contextmanager
def kserve_stub(server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """A KServe v2 stub on ``server`` that may send messages above its limit."""
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
