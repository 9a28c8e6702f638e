"""Bad input over REST gets a clear status and a JSON error body, and the server goes on.

The cases the gRPC tests send (tests/bad_inference_cases.py) in their KServe v2 HTTP form, then
what only HTTP can get wrong: the JSON itself, Content-Length, Triton's binary header, data
that disagrees with its shape, bodies over --max-message-bytes, unknown routes and methods.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterable

import numpy as np
import pytest

from tests.bad_inference_cases import HTTP_STATUS, REQUEST_CASES, TENSOR_CASES, Case, rest_form
from tests.limited_server import MAX_MESSAGE, limited_server

DIGITS = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server():
    with limited_server() as process:
        yield process


def send(
    server, path: str, body: bytes | Iterable[bytes] | None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """POST (GET without a body) ``path``; the status and the body, whatever the status."""
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(
        server.http_url + path, data=body, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def valid(rows: int = 1) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 1, 8, 8],
                        "data": [0.0] * (64 * rows)}]}  # fmt: skip


def assert_refused(server, status: int, pattern: str, path: str, body, headers=None) -> None:
    """The answer is ``status`` with a JSON error matching ``pattern``; the server still serves."""
    got, answer = send(server, path, body, headers)
    assert got == status, answer
    error = json.loads(answer)["error"]
    assert re.search(pattern, error), error
    ok, reply = send(server, DIGITS, json.dumps(valid()).encode())
    assert ok == 200, reply
    logits = json.loads(reply)["outputs"][0]
    assert logits["shape"] == [1, 10] and np.isfinite(logits["data"]).all()


@pytest.mark.parametrize(
    "case",
    [case for case in TENSOR_CASES + REQUEST_CASES if case.rest != ""],
    ids=lambda case: case.name,
)
def test_the_grpc_cases_over_rest(server, case: Case) -> None:
    path, body, headers = rest_form(case.build())
    pattern = case.pattern if case.rest is None else case.rest
    assert_refused(server, HTTP_STATUS[case.code], pattern, path, body, headers)


MALFORMED = {
    "not json": (b"{nope", r"the request body is not valid JSON: Expecting property name"),
    "not utf-8": (b'{"inputs": "\xff"}', r"the request body is not valid JSON: .*utf-8"),
    "not an object": (b"[1, 2]", r"the request body must be a JSON object, got a list"),
    "no inputs": (b"{}", r"'inputs' must be a list of tensors, got null"),
    "too deep": (b"[" * 100_000, r"nested too deeply|not valid JSON"),
    "id not a string": (b'{"id": 7, "inputs": []}', r"'id' must be a string, got a number"),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_json(server, body: tuple[bytes, str]) -> None:
    assert_refused(server, 400, body[1], DIGITS, body[0])


def tensor(**fields) -> bytes:
    entry = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], **fields}
    return json.dumps({"inputs": [entry]}).encode()


TENSORS = {
    "shape disagrees with the data": (
        tensor(data=[0.0] * 60),
        r"input 'input': data holds 60 values; shape \[1, 1, 8, 8\] needs 64",
    ),
    "ragged nested data": (
        tensor(data=[[0.0] * 32, [0.0] * 31]),
        r"'data' is not a list of numbers of one length per level",
    ),
    "strings as numbers": (tensor(data=["0"] * 64), r"FP32 data must be numbers"),
    "data not a list": (tensor(data=3), r"'data' must be a list, got a number"),
    "shape not integers": (tensor(shape=[1, 1, 8, 8.5], data=[0] * 64), r"'shape' must be a list"),
    "no data": (tensor(), r"input 'input' has neither 'data' nor a binary_data_size parameter"),
    "no name": (json.dumps({"inputs": [{"shape": [1]}]}).encode(), r"'name' must be a string"),
    "binary flag not a bool": (
        json.dumps(
            {**valid(), "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]}
        ).encode(),
        r"output 'logits' parameter 'binary_data' must be true or false, got 1",
    ),
}


@pytest.mark.parametrize("body", TENSORS.values(), ids=list(TENSORS))
def test_tensors_that_disagree_with_themselves(server, body: tuple[bytes, str]) -> None:
    assert_refused(server, 400, body[1], DIGITS, body[0])


def test_nested_data_is_row_major(server) -> None:
    flat = np.arange(64, dtype=np.float32) / 64
    answers = []
    for data in (flat.tolist(), flat.reshape(1, 1, 8, 8).tolist()):
        status, reply = send(server, DIGITS, tensor(data=data))
        assert status == 200, reply
        answers.append(json.loads(reply)["outputs"][0]["data"])
    assert answers[0] == answers[1]


def binary(header_length: str, size: int, sent: int) -> tuple[bytes, dict[str, str]]:
    header = tensor(parameters={"binary_data_size": size})
    length = str(len(header)) if header_length == "true" else header_length
    return header + bytes(sent), {"Inference-Header-Content-Length": length}


BINARY = {
    "header longer than the body": (
        ("100000", 256, 256),
        r"Inference-Header-Content-Length is 100000 but the body holds \d+ bytes",
    ),
    "header not a number": (("12a", 256, 256), r"must be a byte count, got '12a'"),
    "size past the end": (
        ("true", 256, 100),
        r"binary_data_size 256 runs past the end of the binary data \(100 bytes left\)",
    ),
    "bytes left over": (("true", 256, 300), r"44 bytes of binary data follow the inputs'"),
    "size disagrees with the shape": (
        ("true", 100, 100),
        r"raw contents hold 100 bytes; shape \[1, 1, 8, 8\] of FP32 needs 256",
    ),
}


@pytest.mark.parametrize("sent", BINARY.values(), ids=list(BINARY))
def test_a_binary_header_that_disagrees_with_the_body(server, sent) -> None:
    (header_length, size, count), pattern = sent
    body, headers = binary(header_length, size, count)
    assert_refused(server, 400, pattern, DIGITS, body, headers)


def test_a_content_length_shorter_than_the_body(server) -> None:
    # The bytes past the Content-Length parse as no HTTP request: aiohttp's parser answers 400
    # and closes the connection, and the server logs no traceback.
    body = json.dumps(valid()).encode()
    start = len(server.log())
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", DIGITS, body=body, headers={"Content-Length": "40"})
        answer = connection.getresponse()
        assert answer.status == 400
        assert b"Traceback" not in answer.read()
    finally:
        connection.close()
    assert send(server, DIGITS, body)[0] == 200
    assert "Traceback" not in server.log()[start:]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_message_bytes_is_413(server, chunked: bool) -> None:
    body = json.dumps(valid()).encode() + b" " * MAX_MESSAGE
    sent: bytes | Iterable[bytes] = iter([body[: len(body) // 2], body[len(body) // 2 :]])
    assert_refused(
        server,
        413,
        rf"the request body.* is larger than the server accepts \({MAX_MESSAGE} bytes; "
        r"--max-message-bytes\)",
        DIGITS,
        sent if chunked else body,
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "pattern"),
    [
        ("/v2/nothing/here", None, 404, r"Not Found: GET /v2/nothing/here"),
        ("/v2/health/ready", b"{}", 405, r"Method Not Allowed: POST /v2/health/ready"),
        ("/v2/models/nope", None, 404, r"model 'nope' is not served"),
        ("/v2/models/digits/versions/abc/ready", None, 400, r"positive integer, got 'abc'"),
        ("/v2/models/digits/versions/9/config", None, 404, r"version '9' is not served"),
        ("/v2/repository/models/digits/unload", b"", 503, r"explicit model load / unload"),
        ("/v2/repository/index", b'{"ready": 1}', 400, r"'ready': expected a boolean"),
    ],
)
def test_other_endpoints_answer_json_errors(server, path, body, status, pattern) -> None:
    assert_refused(server, status, pattern, path, body)
