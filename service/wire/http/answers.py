"""A model's rows for one HTTP request as KServe v2's JSON answer, with Triton's binary data.

Each output goes as JSON ``data`` (row-major, flat) or, where the request asked for binary data,
as bytes after the JSON header with its ``binary_data_size``; the header's length is then sent
in ``Inference-Header-Content-Length``. The classification extension's top-k strings are BYTES:
JSON strings, or Triton's length-prefixed elements (:func:`service.wire.codec.pack_strings`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.wire.codec import classification, pack_strings
from service.wire.http.tensors import HttpInference, requested

__all__ = ["encode_inference"]


def encode_inference(
    inference: HttpInference,
    model: tuple[str, int],
    outputs: Sequence[tuple[str, str, np.ndarray]],
    labels: Sequence[str] | None,
) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON header's length when binary data follows it.

    Args:
        inference: the decoded request (its id, requested outputs and their encodings).
        model: the served name and the version that answered.
        outputs: every model output as (name, datatype, rows of this request).
        labels: class labels for the classification extension, if the model has them.
    """
    by_name = {name: (datatype, value) for name, datatype, value in outputs}
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output, binary in requested(inference, [name for name, _, _ in outputs]):
        datatype, value = by_name[output.name]
        entry: dict[str, Any] = {"name": output.name}
        data: Any
        if output.classification:
            shape, strings = classification(value, output.classification, labels)
            entry.update(datatype="BYTES", shape=shape)
            data = pack_strings(strings) if binary else strings
        else:
            entry.update(datatype=datatype, shape=list(value.shape))
            data = np.ascontiguousarray(value).tobytes() if binary else value.ravel().tolist()
        if binary:
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = data
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model[0], "model_version": str(model[1])}
    if inference.request.id:
        document["id"] = inference.request.id
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
