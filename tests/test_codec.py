"""Typed (non-raw) KServe contents decode to exactly the values sent, in the tensor's datatype."""

from __future__ import annotations

from tests.apart import run_apart

# Our stubs cannot share a process with tritonclient's (the same proto file), so in one apart.
TYPED = r"""
import json, math
import numpy as np
from service.wire import codec
from service._generated.inference import grpc_service_pb2 as pb
from service.core.errors import InvalidArgument

cases = {
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
exact, packed = {}, {}
for datatype, values in cases.items():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, len(values)])
    field = codec._TYPED_FIELD[datatype]
    getattr(tensor.contents, field).extend(values)
    dtype = codec.NUMPY_TYPES[datatype]
    decoded = codec.decode_request(request, 1000).inputs["x"]
    expected = np.array(values, dtype).reshape(1, len(values))
    exact[datatype] = (
        decoded.dtype == dtype and decoded.shape == expected.shape
        and decoded.tobytes() == expected.tobytes()
    )
    packed[datatype] = codec._packed(tensor.contents, field, len(values)) is not None

refused = {}
for datatype, value in (("INT8", 128), ("INT16", -40000), ("UINT8", 256), ("UINT16", 70000)):
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, codec._TYPED_FIELD[datatype]).extend([1, value])
    try:
        codec.decode_request(request, 1000)
        refused[datatype] = None
    except InvalidArgument as exc:
        refused[datatype] = str(exc)
print(json.dumps({"exact": exact, "packed": packed, "refused": refused}))
"""


def test_typed_contents_decode_exactly_and_floats_take_the_block_path() -> None:
    report = run_apart(TYPED)
    assert report["exact"] == dict.fromkeys(report["exact"], True), report["exact"]
    assert len(report["exact"]) == 11
    # FP32 and FP64 are read as one block off the wire; the others value by value.
    assert {k for k, v in report["packed"].items() if v} == {"FP32", "FP64"}
    for datatype, message in report["refused"].items():
        assert (
            message == f"input 'x': a value in {'uint' if 'U' in datatype else 'int'}_contents "
            f"is out of range for {datatype}"
        ), (datatype, message)
