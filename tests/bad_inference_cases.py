"""Bad inference requests and what each must be told: one list, sent over gRPC and over REST.

Each case is a KServe ``ModelInferRequest`` with the gRPC status and message it gets
(tests/test_bad_input.py, tests/test_bad_requests.py); :func:`rest_form` turns the same request
into its KServe v2 HTTP form (raw contents as Triton's binary data, typed contents as JSON
``data``) and tests/test_rest_bad_input.py expects the HTTP status of that code with the same
message, or the case's own REST message where the protocols word it differently.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from tests.limited_server import request

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
}
"""The HTTP status of each code these cases get (none of them is a full queue)."""


@dataclass(frozen=True)
class Case:
    """A bad request, its gRPC status and message pattern, and its REST message if it differs.

    ``rest`` None: the REST form says what gRPC says; ``""``: the case has no REST form (a
    gRPC-only field such as raw and typed contents at once).
    """

    name: str
    build: Callable[[], service_pb2.ModelInferRequest]
    code: grpc.StatusCode
    pattern: str
    rest: str | None = None


def _zeros(shape: tuple[int, ...]) -> service_pb2.ModelInferRequest:
    return request(shape=shape, data=np.zeros(shape, np.float32).tobytes())


def _version(version: str) -> service_pb2.ModelInferRequest:
    message = request()
    message.model_version = version
    return message


def _extra_input() -> service_pb2.ModelInferRequest:
    message = request()
    message.inputs.add(name="mask", datatype="FP32", shape=[1])
    message.raw_input_contents.append(b"\x00" * 4)
    return message


def _typed(count: int) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="digits")
    tensor = message.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    tensor.contents.fp32_contents.extend([0.0] * count)
    return message


def _zero_beside_huge(typed: bool) -> service_pb2.ModelInferRequest:
    message = request(shape=(0, 1 << 62, 1 << 62, 1), data=b"")
    if typed:  # no elements either way: numpy would refuse to shape them ("array is too big")
        del message.raw_input_contents[:]
        message.inputs[0].contents.SetInParent()
    return message


def _many_inputs() -> service_pb2.ModelInferRequest:
    message = request()
    for number in range(300):
        message.inputs.add(name=f"extra{number}", datatype="FP32", shape=[1])
        message.raw_input_contents.append(bytes(4))
    return message


def _outputs(*names: str) -> service_pb2.ModelInferRequest:
    message = request()
    for name in names:
        message.outputs.add(name=name)
    return message


def _bad_timeout() -> service_pb2.ModelInferRequest:
    message = request()
    message.parameters["timeout"].string_param = "soon"
    return message


def _shared_memory(tensor: str) -> service_pb2.ModelInferRequest:
    message = request()
    if tensor == "input":  # Triton's clients send no contents for a tensor in shared memory
        del message.raw_input_contents[:]
        target = message.inputs[0]
    else:
        target = message.outputs.add(name="logits")
    target.parameters["shared_memory_region"].string_param = "region0"
    target.parameters["shared_memory_byte_size"].int64_param = 256
    return message


INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED
UNSERVED = grpc.StatusCode.NOT_FOUND
_HUGE = r"4611686018427387904"

TENSOR_CASES = [
    Case("unknown model", lambda: request(model="nope"), UNSERVED, r"model 'nope' is not served"),
    Case(
        "unknown version",
        lambda: _version("7"),
        UNSERVED,
        r"model 'digits' version '7' is not served",
    ),
    Case(
        "wrong datatype",
        lambda: request(datatype="FP64", data=np.zeros((1, 1, 8, 8), np.float64).tobytes()),
        INVALID,
        r"input 'input': datatype FP64 does not match the model's FP32",
    ),
    Case(
        "unsupported datatype",
        lambda: request(datatype="COMPLEX"),
        INVALID,
        r"datatype 'COMPLEX' is not supported",
    ),
    Case(
        "wrong shape",
        lambda: _zeros((1, 1, 8, 9)),
        INVALID,
        r"shape \[1, 1, 8, 9\] does not match the model's \[-1, 1, 8, 8\] at dimension 3",
    ),
    Case("wrong rank", lambda: _zeros((1, 64)), INVALID, r"has rank 2; the model expects rank 4"),
    Case(
        "raw byte length",
        lambda: request(data=b"\x00" * 100),
        INVALID,
        r"raw contents hold 100 bytes; shape \[1, 1, 8, 8\] of FP32 needs 256",
    ),
    Case(
        "missing input",
        lambda: service_pb2.ModelInferRequest(model_name="digits"),
        INVALID,
        r"input 'input' is missing; model 'digits' takes inputs \['input'\]",
    ),
    Case("extra input", _extra_input, INVALID, r"input 'mask' is unknown"),
    Case(
        "typed count",
        lambda: _typed(63),
        INVALID,
        r"fp32_contents holds 63 values; shape \[1, 1, 8, 8\] needs 64",
        rest=r"data holds 63 values; shape \[1, 1, 8, 8\] needs 64",
    ),
    Case(
        "batch above max",
        lambda: _zeros((33, 1, 8, 8)),
        INVALID,
        r"batch of 33 is outside 1..32 \(max_batch_size of model 'digits'\)",
    ),
    Case(
        "negative dimension",
        lambda: request(shape=(1, 1, -8, 8)),
        INVALID,
        r"shape \[1, 1, -8, 8\] has a negative dimension",
    ),
    Case(
        "huge claimed shape",  # 2**60 elements claimed, 256 bytes sent: refused before allocation
        lambda: request(shape=(1, 1, 1 << 30, 1 << 30)),
        TOO_LARGE,
        r"has 1152921504606846976 elements; the server accepts at most 100000",
    ),
    *(
        Case(
            f"a zero beside huge dimensions ({'typed' if typed else 'raw'})",
            lambda typed=typed: _zero_beside_huge(typed),
            TOO_LARGE,
            rf"shape \[0, {_HUGE}, {_HUGE}, 1\] has a dimension of {_HUGE}; the server accepts "
            r"at most 100000 elements per tensor",
        )
        for typed in (False, True)
    ),
    Case(
        "a rank beyond any model",
        lambda: request(shape=(1,) * 70, data=bytes(4)),
        INVALID,
        r"input 'input': shape has 70 dimensions; the server accepts at most 32",
    ),
    Case(
        "thousands of inputs",
        _many_inputs,
        INVALID,
        r"the request has 301 inputs; the server accepts at most 256",
    ),
]
"""The tensors' cases (tests/test_bad_input.py)."""

REQUEST_CASES = [
    Case(
        "a version longer than any number",  # int() refuses more than 4300 digits
        lambda: _version("9" * 5000),
        UNSERVED,
        r"model 'digits' version '9999",
    ),
    Case(  # Whole, the message would pass gRPC's 16 KiB header limit
        "a message quoting a huge value is cut",
        lambda: _outputs("x" * 100_000),
        INVALID,
        r"^output 'x{1000,}\.\.\. \(\d+ more characters\)$",
    ),
    Case(
        "dense input smaller than the window",
        lambda: request(model="digits_dense", shape=(1, 1, 6, 20), data=bytes(4 * 120)),
        INVALID,
        r"spatial size \[6, 20\] is smaller than the model's window \[8, 8\]",
    ),
    Case(
        "bad timeout parameter",
        _bad_timeout,
        INVALID,
        r"parameter 'timeout' must be a non-negative integer",
    ),
    Case(
        "unknown requested output",
        lambda: _outputs("probabilities"),
        INVALID,
        r"output 'probabilities' is unknown; model 'digits' has outputs \['logits'\]",
    ),
    *(  # "²" and an Arabic-Indic one are isdigit()
        Case(
            f"non-numeric version {version!r}",
            lambda version=version: _version(version),
            INVALID,
            f"model version must be a positive integer, got '{version}'",
        )
        for version in ("latest", "\u00b2", "\u0661")
    ),
    Case(
        "an output requested twice",
        lambda: _outputs("logits", "logits"),
        INVALID,
        r"output 'logits' is requested twice",
    ),
    *(
        Case(
            f"a shared memory {tensor} is refused by name",
            lambda tensor=tensor: _shared_memory(tensor),
            INVALID,
            f"{tensor} '(input|logits)' names a shared memory region; .*the shared memory "
            "extensions are not served",
        )
        for tensor in ("input", "output")
    ),
]
"""The requests' cases (tests/test_bad_requests.py)."""


def _parameters(parameters: Any) -> dict[str, Any]:
    found = {}
    for key, value in parameters.items():
        found[key] = getattr(value, value.WhichOneof("parameter_choice"))
    return found


def rest_form(message: service_pb2.ModelInferRequest) -> tuple[str, bytes, dict[str, str]]:
    """The same request over KServe v2 HTTP: path, body and headers."""
    path = f"/v2/models/{urllib.parse.quote(message.model_name, safe='')}"
    if message.model_version:
        path += f"/versions/{urllib.parse.quote(message.model_version, safe='')}"
    inputs, binary = [], []
    for index, tensor in enumerate(message.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": _parameters(tensor.parameters),
        }
        if message.raw_input_contents:
            entry["parameters"]["binary_data_size"] = len(message.raw_input_contents[index])
            binary.append(message.raw_input_contents[index])
        elif "shared_memory_region" not in entry["parameters"]:
            field = tensor.contents.ListFields()
            entry["data"] = list(field[0][1]) if field else []
        inputs.append(entry)
    document: dict[str, Any] = {"inputs": inputs, "parameters": _parameters(message.parameters)}
    if message.outputs:
        document["outputs"] = [
            {"name": o.name, "parameters": _parameters(o.parameters)} for o in message.outputs
        ]
    header = json.dumps(document).encode()
    headers = {"Content-Type": "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return f"{path}/infer", header + b"".join(binary), headers
