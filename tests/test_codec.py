"""Typed (non-raw) KServe contents decode to exactly the values sent, in the tensor's datatype."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service._generated.inference import grpc_service_pb2 as pb
from service.core.errors import InvalidArgument
from service.wire import codec

CASES: dict[str, list[float] | list[int] | list[bool]] = {
    "FP32": [0.0, -0.0, 1.5, -3.25e-39, 3.4e38, math.inf, -math.inf, math.nan],
    "FP64": [0.0, -0.0, 1e-310, -1.7976931348623157e308, math.inf, math.nan, 1 / 3],
    "INT8": [-128, 127, 0],
    "INT16": [-32768, 32767],
    "INT32": [-(2**31), 2**31 - 1],
    "INT64": [-(2**63), 2**63 - 1],
    "UINT8": [0, 255],
    "UINT16": [65535, 1],
    "UINT32": [2**32 - 1, 0],
    "UINT64": [2**64 - 1, 7],
    "BOOL": [True, False, True],
}


def test_every_typed_datatype_is_covered() -> None:
    assert len(CASES) == 11
    assert set(CASES) == set(codec._TYPED_FIELD)


@pytest.mark.parametrize("datatype", CASES)
def test_typed_contents_decode_exactly_and_floats_take_the_block_path(datatype: str) -> None:
    values = CASES[datatype]
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, len(values)])
    field = codec._TYPED_FIELD[datatype]
    getattr(tensor.contents, field).extend(values)
    dtype = codec.NUMPY_TYPES[datatype]
    decoded = codec.decode_request(request, 1000).inputs["x"]
    expected = np.array(values, dtype).reshape(1, len(values))
    assert decoded.dtype == dtype
    assert decoded.shape == expected.shape
    # Bytes, not values: -0.0 and NaN must arrive as sent, which == cannot tell.
    assert decoded.tobytes() == expected.tobytes()
    # FP32 and FP64 are read as one block off the wire; the others value by value.
    packed = codec._packed(tensor.contents, field, len(values)) is not None
    assert packed == (datatype in ("FP32", "FP64"))


@pytest.mark.parametrize(
    ("datatype", "value"), [("INT8", 128), ("INT16", -40000), ("UINT8", 256), ("UINT16", 70000)]
)
def test_typed_integers_out_of_range_are_refused(datatype: str, value: int) -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, codec._TYPED_FIELD[datatype]).extend([1, value])
    with pytest.raises(InvalidArgument) as refused:
        codec.decode_request(request, 1000)
    kind = "uint" if "U" in datatype else "int"
    assert str(refused.value) == (
        f"input 'x': a value in {kind}_contents is out of range for {datatype}"
    )


def test_our_stubs_and_tritonclients_share_a_process() -> None:
    """Both define ``inference.*``; ours live in a pool of their own, so neither import fails."""
    from tritonclient.grpc import service_pb2 as triton_pb

    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(2.5)
    # The same wire format: what one side writes, the other reads.
    theirs = triton_pb.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.inputs[0].contents.fp32_contents == [2.5]
    assert pb.ModelInferRequest.FromString(theirs.SerializeToString()) == request
