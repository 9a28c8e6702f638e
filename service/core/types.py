"""The request types every layer shares, free of gRPC and ONNX Runtime.

A servicer decodes its protocol's message into an :class:`InferenceRequest`; the data plane,
validation, the batcher and classification read it without knowing which protocol it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["NUMPY_TYPES", "InferenceRequest", "RequestedOutput"]

# KServe v2 datatype names and the numpy dtypes they travel as.
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype(np.float32),
    "FP16": np.dtype(np.float16),
    "FP64": np.dtype(np.float64),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "UINT16": np.dtype(np.uint16),
    "INT16": np.dtype(np.int16),
    "UINT32": np.dtype(np.uint32),
    "INT32": np.dtype(np.int32),
    "UINT64": np.dtype(np.uint64),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; ``classification`` > 0 asks for Triton's top-k strings."""

    name: str
    classification: int = 0


@dataclass
class InferenceRequest:
    """A decoded request, the same for every API behind the servicers."""

    model_name: str
    model_version: str
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)
    timeout_us: int = 0
