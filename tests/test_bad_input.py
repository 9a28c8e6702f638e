"""Bad input gets a clear status and message, and never hurts the next request: tensors.

The cases shared with the REST port are in tests/bad_inference_cases.py; the ones here need
gRPC's own fields (raw and typed contents side by side).
"""

from __future__ import annotations

import grpc
import pytest

from tests.bad_inference_cases import TENSOR_CASES, Case
from tests.limited_server import assert_status, kserve_stub, limited_server, request


@pytest.fixture(scope="module")
def server():
    with limited_server() as process:
        yield process


@pytest.fixture(scope="module")
def stub(server):
    with kserve_stub(server) as client:
        yield client


@pytest.mark.parametrize("case", TENSOR_CASES, ids=lambda case: case.name)
def test_bad_tensors(stub, case: Case) -> None:
    assert_status(stub, case.build(), case.code, case.pattern)


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
