"""fp16 files: weights and computation in half precision, inputs and outputs kept fp32.

Clients change nothing: the graph casts its fp32 input to fp16 and its output back. ONNX
Runtime's CUDA provider runs the fp16 kernels; on the CPU the file loads and agrees with fp32
(ONNX Runtime inserts casts around operators it has no fp16 kernel for, so it may be slow).
"""

from __future__ import annotations

import onnx

from .errors import ExportError
from .onnx_export import IR_VERSION, OPSET

__all__ = ["check_pinned", "sort_topologically", "to_fp16"]


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph``'s nodes so each comes after the producers of its inputs.

    The fp16 conversion appends its input and output casts at the end of the node list, which
    ONNX's checker (and any reader walking the nodes in order) refuses.
    """
    available = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the fp16 graph has a cycle or an input nothing produces")
        for node in ready:
            available.update(node.output)
        ordered += ready
        placed = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in placed]
    del graph.node[:]
    graph.node.extend(ordered)


def check_pinned(model: onnx.ModelProto, what: str) -> None:
    """Raise unless ``model`` keeps the pinned IR version and opset.

    The server's ONNX Runtime reads IR versions up to 13; convserve writes 8 with opset 17.
    """
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if model.ir_version != IR_VERSION or opsets != [OPSET]:
        raise ExportError(
            f"the {what} file has IR version {model.ir_version} and opset {opsets}; "
            f"convserve pins IR version {IR_VERSION} and opset {OPSET}"
        )


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with fp16 weights and computation, fp32 input and output; checked by ONNX."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    half: onnx.ModelProto = convert_float_to_float16(copy, keep_io_types=True)
    sort_topologically(half.graph)
    half.ir_version = IR_VERSION
    onnx.checker.check_model(half)
    check_pinned(half, "fp16")
    return half
