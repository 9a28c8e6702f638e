"""KServe v2 / Triton protobuf messages as the JSON Triton's HTTP endpoints answer with.

The metadata, configuration, statistics and index answers are built once, as the gRPC messages
of :mod:`service.wire.kserve_messages`, and turned into JSON here the way Triton does: the
``.proto`` field names (``max_batch_size``, ``data_type``), enum values by name
(``TYPE_FP32``), every field present even at its default, and 64-bit integers as JSON numbers
(protobuf's own JSON mapping writes them as strings, which tritonclient and perf_analyzer do not
read as numbers).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.descriptor import Descriptor, FieldDescriptor  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

__all__ = ["message_json"]

_WIDE = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def message_json(message: Message) -> Any:
    """``message`` as Triton's HTTP JSON (see the module docstring)."""
    document = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    return _numbers(message.DESCRIPTOR, document)


def _numbers(descriptor: Descriptor, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (of a ``descriptor`` message) with its 64-bit integers as numbers."""
    for field in descriptor.fields:
        value = document.get(field.name)
        if value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            document[field.name] = {k: _value(entry, v) for k, v in value.items()}
        elif isinstance(value, list):
            document[field.name] = [_value(field, v) for v in value]
        else:
            document[field.name] = _value(field, value)
    return document


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and isinstance(value, dict):
        return _numbers(field.message_type, value)
    if field.cpp_type in _WIDE and isinstance(value, str):
        return int(value)
    return value
