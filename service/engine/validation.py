"""Does a decoded request fit the model it names? Checked before it is queued.

Messages name the tensor, what was received and what was expected.
"""

from __future__ import annotations

from collections.abc import Hashable

from service.core.errors import InvalidArgument
from service.core.types import NUMPY_TYPES, InferenceRequest
from service.engine.repository import ServedModel

_DATATYPE_OF = {dtype: name for name, dtype in NUMPY_TYPES.items()}

__all__ = ["check_request"]


def _check_names(request: InferenceRequest, model: ServedModel) -> None:
    expected = [spec.name for spec in model.inputs]
    missing = [n for n in expected if n not in request.inputs]
    extra = [n for n in request.inputs if n not in expected]
    if missing:
        raise InvalidArgument(
            f"input '{missing[0]}' is missing; model '{model.name}' takes inputs {expected}"
        )
    if extra:
        raise InvalidArgument(
            f"input '{extra[0]}' is unknown; model '{model.name}' takes inputs {expected}"
        )
    outputs = [spec.name for spec in model.outputs]
    for requested in request.outputs:
        if requested.name not in outputs:
            raise InvalidArgument(
                f"output '{requested.name}' is unknown; model '{model.name}' has outputs {outputs}"
            )
        shape = model.outputs[outputs.index(requested.name)].shape
        # Beyond the first axis (the batch, or a fixed 1), at most one axis that is not 1.
        ranked = [d for d in shape[1:] if d != 1]
        if requested.classification and len(ranked) > 1:
            raise InvalidArgument(
                f"output '{requested.name}' is {list(shape)}: the classification parameter "
                "needs one score per class (a [batch, classes] output, or [classes]); a score "
                "map has no one class axis to rank"
            )


def _check_dense_window(model: ServedModel, name: str, shape: tuple[int, ...]) -> None:
    window = model.info.window
    if not model.dense or not window or len(shape) != len(window) + 2:
        return
    if any(s < w for s, w in zip(shape[2:], window, strict=True)):
        raise InvalidArgument(
            f"input '{name}': spatial size {list(shape[2:])} is smaller than "
            f"the model's window {list(window)}"
        )


def check_request(request: InferenceRequest, model: ServedModel) -> tuple[int, Hashable]:
    """Check ``request`` against ``model``; returns (images, batching key).

    Raises:
        InvalidArgument: missing, unknown or mistyped inputs, wrong rank or dimensions, a batch
            above ``max_batch_size``, or inputs that disagree on the batch size.
    """
    _check_names(request, model)
    batching = model.max_batch_size > 0
    counts = set()
    key = []
    for spec in model.inputs:
        value = request.inputs[spec.name]
        if value.dtype != spec.dtype:
            raise InvalidArgument(
                f"input '{spec.name}': datatype {_DATATYPE_OF.get(value.dtype, value.dtype)} "
                f"does not match the model's {spec.datatype}"
            )
        if value.ndim != len(spec.shape):
            raise InvalidArgument(
                f"input '{spec.name}': shape {list(value.shape)} has rank {value.ndim}; the "
                f"model expects rank {len(spec.shape)} ({list(spec.shape)})"
            )
        start = 1 if batching else 0
        for axis in range(start, value.ndim):
            if spec.shape[axis] not in (-1, value.shape[axis]):
                raise InvalidArgument(
                    f"input '{spec.name}': shape {list(value.shape)} does not match the "
                    f"model's {list(spec.shape)} at dimension {axis}"
                )
        _check_dense_window(model, spec.name, value.shape)
        if batching:
            counts.add(value.shape[0])
        key.append(value.shape[start:])
    if not batching:
        return 1, tuple(key)
    if len(counts) != 1:
        raise InvalidArgument(f"inputs disagree on the batch size: {sorted(counts)}")
    count = counts.pop()
    if not 1 <= count <= model.max_batch_size:
        raise InvalidArgument(
            f"batch of {count} is outside 1..{model.max_batch_size} (max_batch_size of model "
            f"'{model.name}')"
        )
    return count, tuple(key)
