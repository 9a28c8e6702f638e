"""KServe v2 HTTP inference bodies to the shared :class:`InferenceRequest`, checked as gRPC's are.

A body is one JSON document, or (Triton's binary tensor data extension) a JSON header of
``Inference-Header-Content-Length`` bytes followed by the tensors' bytes, each input naming its
share in the ``binary_data_size`` parameter. JSON ``data`` is row-major, flat or nested. Every
size the client gives (shape, element count, byte length, header length) is checked against the
server's limits and against what was received before any array is built, with the messages the
gRPC codec gives (:mod:`service.wire.codec`). Encoding the answer is :mod:`.answers`'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import InvalidArgument
from service.core.types import NUMPY_TYPES, InferenceRequest, RequestedOutput
from service.wire.codec import (
    MAX_INPUTS,
    checked_frombuffer,
    element_count,
    shared_memory_refusal,
)

__all__ = ["HEADER_LENGTH", "HttpInference", "decode_inference", "read_json", "requested"]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The header that gives the JSON part's length when binary tensor data follows it."""

# What JSON values each kind of datatype takes: numpy's kinds of the arrays they make, in words.
_KINDS = {
    "f": ("fiu", "numbers"),
    "i": ("iu", "integers"),
    "u": ("iu", "integers"),
    "b": ("b", "true or false"),
}


@dataclass(frozen=True)
class HttpInference:
    """A decoded HTTP inference request and how its answer is to be sent.

    Attributes:
        request: what the data plane runs.
        binary: output name -> sent as binary data (Triton's ``binary_data`` parameter).
        binary_default: for outputs not named in ``binary`` (``binary_data_output``).
    """

    request: InferenceRequest
    binary: Mapping[str, bool]
    binary_default: bool


def read_json(body: bytes | memoryview, what: str) -> Any:
    """Parse ``body`` as JSON, or refuse it naming ``what`` and where it broke.

    Raises:
        InvalidArgument: not UTF-8 JSON, or nested too deep to parse.
    """
    try:
        return json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"the {what} is nested too deeply to parse") from None


def _split(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary data after it."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgument(f"{HEADER_LENGTH} must be a byte count, got {header_length!r}")
    length = int(text)
    if length > len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} is {length} but the body holds {len(body)} bytes; the JSON header "
            "cannot be longer than the body"
        )
    return view[:length], view[length:]


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _parameters(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = _object(entry.get("parameters", {}), f"{where}: 'parameters'")
    if "shared_memory_region" in parameters:
        raise shared_memory_refusal(where)
    return parameters


def _int_parameter(parameters: Mapping[str, Any], key: str, where: str) -> int:
    value = parameters.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(
            f"{where} parameter '{key}' must be a non-negative integer, got {value!r}"
        )
    return value


def _bool_parameter(parameters: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where} parameter '{key}' must be true or false, got {value!r}")
    return value


def _string(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: '{key}' must be a string, got {_kind(value)}")
    return value


def _shape(entry: Mapping[str, Any], name: str) -> list[int]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers")
    return shape


def _from_json(name: str, datatype: str, data: object, shape: list[int], count: int) -> np.ndarray:
    """Input ``name``'s JSON ``data`` (row-major, flat or nested) as an array of ``shape``."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': 'data' must be a list, got {_kind(data)}")
    try:
        array = np.asarray(data)  # nested lists become axes; ragged ones are refused here
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"input '{name}': 'data' is not a list of numbers of one length per level"
        ) from None
    if array.size != count:
        raise InvalidArgument(
            f"input '{name}': data holds {array.size} values; shape {shape} needs {count}"
        )
    dtype = NUMPY_TYPES[datatype]
    kinds, wanted = _KINDS[dtype.kind]
    if count and array.dtype.kind not in kinds:
        raise InvalidArgument(f"input '{name}': {datatype} data must be {wanted}")
    if count and dtype.kind in "iu" and array.dtype != dtype:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise InvalidArgument(f"input '{name}': a value in data is out of range for {datatype}")
    return array.astype(dtype, copy=False).reshape(shape)


class _Binary:
    """The binary data after the JSON header, handed out input by input in order."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._offset = 0

    def take(self, name: str, size: int) -> memoryview:
        left = len(self._data) - self._offset
        if size > left:
            raise InvalidArgument(
                f"input '{name}': binary_data_size {size} runs past the end of the binary data "
                f"({left} bytes left)"
            )
        self._offset += size
        return self._data[self._offset - size : self._offset]

    def check_used(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise InvalidArgument(
                f"{left} bytes of binary data follow the inputs' binary_data_size; "
                f"{HEADER_LENGTH} or a binary_data_size is wrong"
            )


def _input(entry: object, index: int, binary: _Binary, max_elements: int) -> tuple[str, np.ndarray]:
    tensor = _object(entry, f"inputs[{index}]")
    name = _string(tensor, "name", f"inputs[{index}]")
    where = f"input '{name}'"
    parameters = _parameters(tensor, where)
    datatype = _string(tensor, "datatype", where)
    if datatype not in NUMPY_TYPES:
        raise InvalidArgument(f"{where}: datatype '{datatype}' is not supported")
    shape = _shape(tensor, name)
    if "binary_data_size" in parameters:
        if "data" in tensor:
            raise InvalidArgument(f"{where}: both 'data' and binary_data_size are given")
        size = _int_parameter(parameters, "binary_data_size", where)
        raw = binary.take(name, size)
        return name, checked_frombuffer(name, shape, datatype, raw, max_elements)
    if "data" not in tensor:
        raise InvalidArgument(f"{where} has neither 'data' nor a binary_data_size parameter")
    count = element_count(name, shape, max_elements)
    return name, _from_json(name, datatype, tensor["data"], shape, count)


def _outputs(entries: object, default: bool) -> tuple[list[RequestedOutput], dict[str, bool]]:
    if not isinstance(entries, list):
        raise InvalidArgument(f"'outputs' must be a list, got {_kind(entries)}")
    outputs: dict[str, RequestedOutput] = {}
    binary: dict[str, bool] = {}
    for index, entry in enumerate(entries):
        tensor = _object(entry, f"outputs[{index}]")
        name = _string(tensor, "name", f"outputs[{index}]")
        if name in outputs:
            raise InvalidArgument(f"output '{name}' is requested twice")
        where = f"output '{name}'"
        parameters = _parameters(tensor, where)
        outputs[name] = RequestedOutput(name, _int_parameter(parameters, "classification", where))
        binary[name] = _bool_parameter(parameters, "binary_data", where, default)
    return list(outputs.values()), binary


def decode_inference(
    body: bytes, header_length: str | None, model: tuple[str, str], max_elements: int
) -> HttpInference:
    """Decode an inference body for ``model`` (name and version, from the path).

    Args:
        body: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` header, if sent.
        model: the model name and version ("" for the server's choice) the path names.
        max_elements: most elements of one tensor.

    Raises:
        InvalidArgument: malformed JSON, a wrong type or value anywhere, a binary header that
            disagrees with the body, data that disagrees with its shape.
        ResourceExhausted: a tensor larger than ``max_elements``.
    """
    header, data = _split(body, header_length)
    document = _object(read_json(header, "request body"), "the request body")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {_kind(request_id)}")
    parameters = _object(document.get("parameters", {}), "'parameters'")
    timeout = _int_parameter(parameters, "timeout", "request")
    default = _bool_parameter(parameters, "binary_data_output", "request", False)
    entries = document.get("inputs")
    if not isinstance(entries, list):
        raise InvalidArgument(f"'inputs' must be a list of tensors, got {_kind(entries)}")
    if len(entries) > MAX_INPUTS:
        raise InvalidArgument(
            f"the request has {len(entries)} inputs; the server accepts at most {MAX_INPUTS}"
        )
    binary = _Binary(data)
    inputs: dict[str, np.ndarray] = {}
    for index, entry in enumerate(entries):
        name, array = _input(entry, index, binary, max_elements)
        if name in inputs:
            raise InvalidArgument(f"input '{name}' is given twice")
        inputs[name] = array
    binary.check_used()
    outputs, binary_outputs = _outputs(document.get("outputs", []), default)
    request = InferenceRequest(model[0], model[1], request_id, inputs, outputs, timeout)
    return HttpInference(request, binary_outputs, default)


def requested(inference: HttpInference, names: Sequence[str]) -> list[tuple[RequestedOutput, bool]]:
    """The outputs to answer, in order, each with whether it goes as binary data."""
    wanted = inference.request.outputs or [RequestedOutput(name) for name in names]
    return [(o, inference.binary.get(o.name, inference.binary_default)) for o in wanted]
