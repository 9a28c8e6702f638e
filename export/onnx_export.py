"""Write a PyTorch module as an ONNX file that onnxruntime-gpu 1.31 loads, and check it.

Pinned: opset 17 and IR version 8 (onnxruntime 1.31 reads IR versions up to 13). The TorchScript
exporter is used on purpose: it takes the ``torch.fx`` graph of the dense variant as it is and
names dynamic axes directly, without the extra ``onnxscript`` dependency of the dynamo exporter.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model_format import INPUT_NAME, OUTPUT_NAME

__all__ = [
    "IR_VERSION",
    "OPSET",
    "max_abs_diff",
    "ort_session",
    "write_metadata",
    "write_onnx",
]

OPSET = 17
IR_VERSION = 8


def write_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, dynamic_axes: Mapping[int, str]
) -> onnx.ModelProto:
    """Export ``module`` to ``path`` with the pinned opset and IR version.

    Args:
        module: a module in eval mode.
        example: an input of the shape to trace with.
        path: destination file; its folder must exist.
        dynamic_axes: input axes (index to name) that stay symbolic; the output gets the batch
            axis and, for a dense model, the spatial axes under the same names.
    """
    output_axes = {0: dynamic_axes[0]}
    output_axes.update({axis: f"cells_{name}" for axis, name in dynamic_axes.items() if axis})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dict(dynamic_axes), OUTPUT_NAME: output_axes},
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def write_metadata(model: onnx.ModelProto, path: Path, entries: Mapping[str, object]) -> None:
    """Store ``entries`` (each as a JSON document) in ``model``, then save it to ``path``."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key = key
        prop.value = json.dumps(value, sort_keys=True)
    onnx.save(model, str(path))


def ort_session(path: Path) -> object:
    """A CPU ONNX Runtime session for checking an exported file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(module: nn.Module, path: Path, inputs: Sequence[np.ndarray]) -> float:
    """Largest absolute difference between ``module`` and the ONNX file over ``inputs``."""
    session = ort_session(path)
    worst = 0.0
    for batch in inputs:
        with torch.no_grad():
            expected = module(torch.from_numpy(batch)).numpy()
        got = session.run(None, {INPUT_NAME: batch})[0]  # type: ignore[attr-defined]
        if got.shape != expected.shape:
            raise ValueError(
                f"ONNX output shape {list(got.shape)} differs from PyTorch's {list(expected.shape)}"
            )
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst
