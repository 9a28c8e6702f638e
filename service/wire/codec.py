"""KServe v2 protobuf messages to numpy arrays and back, checked before any allocation.

Every size that comes from the client (shape, element count, byte length) is checked against the
server's limits and against the bytes actually received before ``numpy.frombuffer`` views them;
raw contents are never copied on the way in.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from service._generated.inference import grpc_service_pb2 as pb
from service.core.errors import InvalidArgument, ResourceExhausted
from service.core.types import NUMPY_TYPES, InferenceRequest, RequestedOutput

__all__ = [
    "MAX_INPUTS",
    "MAX_RANK",
    "checked_frombuffer",
    "classification",
    "decode_request",
    "element_count",
    "encode_response",
    "pack_strings",
    "shared_memory_refusal",
]

# Which typed-contents field carries each datatype (FP16 and BF16 travel only as raw bytes).
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _parameter(params: object, key: str) -> object:
    value = params.get(key)  # type: ignore[attr-defined]
    if value is None:
        return None
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def _int_parameter(params: object, key: str, where: str) -> int:
    value = _parameter(params, key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(
            f"{where} parameter '{key}' must be a non-negative integer, got {value!r}"
        )
    return value


def shared_memory_refusal(where: str) -> InvalidArgument:
    """The refusal of a tensor that names a shared memory region (``where``: which tensor)."""
    return InvalidArgument(
        f"{where} names a shared memory region; this server takes tensors in the request "
        "only (the shared memory extensions are not served)"
    )


def _refuse_shared_memory(params: object, where: str) -> None:
    if params and _parameter(params, "shared_memory_region") is not None:  # usually none at all
        raise shared_memory_refusal(where)


MAX_RANK = 32
"""Most dimensions a tensor may have (numpy's own limit is 64)."""

MAX_INPUTS = 256
"""Most input tensors one request may name (before any is matched against the model)."""


def element_count(name: str, shape: Sequence[int], limit: int) -> int:
    """The elements of input ``name`` of ``shape``, checked against the rank and ``limit``.

    Raises:
        InvalidArgument: too many dimensions, or a negative one.
        ResourceExhausted: more than ``limit`` elements, or a dimension above it.
    """
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"input '{name}': shape has {len(shape)} dimensions; the server accepts at most "
            f"{MAX_RANK}"
        )
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > limit:
        raise ResourceExhausted(
            f"input '{name}': shape {list(shape)} has {count} elements; the server accepts at "
            f"most {limit} per tensor"
        )
    if any(d > limit for d in shape):  # with a 0 elsewhere: no elements, but numpy refuses it
        raise ResourceExhausted(
            f"input '{name}': shape {list(shape)} has a dimension of {max(shape)}; the server "
            f"accepts at most {limit} elements per tensor"
        )
    return count


def checked_frombuffer(
    name: str, shape: Sequence[int], datatype: str, raw: bytes | memoryview, max_elements: int
) -> np.ndarray:
    """View ``raw`` as an array of ``shape`` after checking the element count and byte length.

    Raises:
        InvalidArgument: a negative dimension or a byte length that does not match the shape.
        ResourceExhausted: more than ``max_elements`` elements.
    """
    count = element_count(name, shape, max_elements)
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"input '{name}': raw contents hold {len(raw)} bytes; shape {list(shape)} of "
            f"{datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def _from_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, count: int, dtype: np.dtype
) -> np.ndarray:
    field_name = _TYPED_FIELD.get(tensor.datatype)
    if field_name is None:
        raise InvalidArgument(
            f"input '{tensor.name}': {tensor.datatype} can only be sent as raw_input_contents"
        )
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field_name]
    if others:
        raise InvalidArgument(
            f"input '{tensor.name}': {tensor.datatype} values go in {field_name}, but "
            f"{', '.join(others)} is set"
        )
    values = getattr(tensor.contents, field_name)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{tensor.name}': {field_name} holds {len(values)} values; shape "
            f"{list(tensor.shape)} needs {count}"
        )
    array = _packed(tensor.contents, field_name, count)
    if array is None:
        # The values one by one, in C, into the field's own type (every value fits), not an
        # array of Python's widest type: half the memory for INT32, say.
        array = np.fromiter(values, _FIELD_TYPES[field_name], count)
        if dtype.kind in "iu" and count and array.dtype != dtype:
            limits = np.iinfo(dtype)
            if array.min() < limits.min or array.max() > limits.max:
                raise InvalidArgument(
                    f"input '{tensor.name}': a value in {field_name} is out of range for "
                    f"{tensor.datatype}"
                )
    return array.astype(dtype, copy=False).reshape(tuple(tensor.shape))


# The numpy type of each typed-contents field as the message holds it.
_FIELD_TYPES: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


# The fields whose packed wire form is the array itself: little-endian IEEE numbers.
_FIXED_WIDTH = {
    name: kind.newbyteorder("<") for name, kind in _FIELD_TYPES.items() if kind.kind == "f"
}


def _packed(contents: pb.InferTensorContents, field_name: str, count: int) -> np.ndarray | None:
    """FP32 or FP64 values read as one block off the wire, or None where that does not apply.

    A proto3 repeated float or double is packed: on the wire, a tag, a length and the values
    as little-endian IEEE numbers, which is an array already. Serialising the contents (only
    this field is set, as checked) is one memory copy, where taking the values one by one is a
    Python-level loop that holds the event loop far longer. Anything unexpected in the framing
    gives None, and the caller takes the values one by one.
    """
    wire_dtype = _FIXED_WIDTH.get(field_name)
    if wire_dtype is None or not count:
        return None
    wire = contents.SerializeToString()
    tag = contents.DESCRIPTOR.fields_by_name[field_name].number << 3 | 2  # length-delimited
    if not wire or wire[0] != tag:
        return None
    length, offset, shift = 0, 1, 0  # after the one-byte tag (field numbers below 16)
    while offset < len(wire) and shift < 64:
        byte = wire[offset]
        offset += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if length != count * wire_dtype.itemsize or len(wire) - offset != length:
        return None
    return np.frombuffer(wire, wire_dtype, count, offset)


def decode_request(request: pb.ModelInferRequest, max_elements: int) -> InferenceRequest:
    """Turn a ModelInferRequest into arrays, after checking every client-supplied size.

    Raises:
        InvalidArgument: raw and typed contents mixed, a count or byte length that does not
            match the shape, an unknown datatype, or a bad parameter.
        ResourceExhausted: a tensor larger than ``max_elements``.
    """
    if len(request.inputs) > MAX_INPUTS:
        raise InvalidArgument(
            f"the request has {len(request.inputs)} inputs; the server accepts at most {MAX_INPUTS}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the same order"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{tensor.name}' is given twice")
        _refuse_shared_memory(tensor.parameters, f"input '{tensor.name}'")
        dtype = NUMPY_TYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidArgument(
                f"input '{tensor.name}': datatype '{tensor.datatype}' is not supported"
            )
        if raw and tensor.HasField("contents"):
            raise InvalidArgument(
                f"input '{tensor.name}': both raw_input_contents and contents are set; "
                "use one of them for all inputs"
            )
        if raw:
            inputs[tensor.name] = checked_frombuffer(
                tensor.name, tensor.shape, tensor.datatype, raw[index], max_elements
            )
        else:
            count = element_count(tensor.name, tensor.shape, max_elements)
            inputs[tensor.name] = _from_typed(tensor, count, dtype)
    outputs: dict[str, RequestedOutput] = {}  # by name, as the inputs: one look-up a name
    for o in request.outputs:
        if o.name in outputs:
            raise InvalidArgument(f"output '{o.name}' is requested twice")
        _refuse_shared_memory(o.parameters, f"output '{o.name}'")
        outputs[o.name] = RequestedOutput(
            o.name, _int_parameter(o.parameters, "classification", f"output '{o.name}'")
        )
    return InferenceRequest(
        request.model_name,
        request.model_version,
        request.id,
        inputs,
        list(outputs.values()),
        _int_parameter(request.parameters, "timeout", "request"),
    )


def _top_k(rows: np.ndarray, k: int, labels: Sequence[str] | None) -> list[str]:
    """Per row of ``rows``, its top-k as "value:index[:label]", row after row."""
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    found = []
    for row, indices in zip(rows, top, strict=True):
        for index in indices:
            text = f"{row[index]:f}:{index}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            found.append(text)
    return found


def classification(
    value: np.ndarray, k: int, labels: Sequence[str] | None
) -> tuple[list[int], list[str]]:
    """Triton's classification extension for one output: its BYTES shape and top-k strings.

    ``value``: the output's rows of one request (a vector is one row); ``k``: the requested
    class count, at most the classes there are.
    """
    rows = value.reshape(1 if value.ndim <= 1 else value.shape[0], -1)
    k = min(k, rows.shape[1] or 1)
    shape = [k] if value.ndim <= 1 else [rows.shape[0], k]
    return shape, _top_k(rows, k, labels)


def pack_strings(strings: Sequence[str]) -> bytes:
    """BYTES elements as Triton sends them raw: each a 4-byte little-endian length, then it."""
    parts = []
    for text in strings:
        encoded = text.encode()
        parts.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(parts)


def encode_response(
    request: InferenceRequest,
    model_name: str,
    version: int,
    outputs: Sequence[tuple[str, str, np.ndarray]],
    labels: Sequence[str] | None,
) -> pb.ModelInferResponse:
    """Build a ModelInferResponse with raw output contents.

    Args:
        request: the decoded request (its id and requested outputs).
        model_name: the served name.
        version: the version that answered.
        outputs: every model output as (name, datatype, rows of this request).
        labels: class labels for the classification extension, if the model has them.
    """
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=str(version), id=request.id
    )
    wanted = request.outputs or [RequestedOutput(name) for name, _, _ in outputs]
    by_name = {name: (datatype, value) for name, datatype, value in outputs}
    for requested in wanted:
        datatype, value = by_name[requested.name]
        tensor = response.outputs.add(name=requested.name)
        if requested.classification:
            shape, strings = classification(value, requested.classification, labels)
            tensor.datatype = "BYTES"
            tensor.shape.extend(shape)
            response.raw_output_contents.append(pack_strings(strings))
        else:
            tensor.datatype = datatype
            tensor.shape.extend(value.shape)
            response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
    return response
