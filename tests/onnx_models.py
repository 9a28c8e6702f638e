"""Tiny ONNX models built in code, with no convserve metadata, as any exporter could make."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _save(model: onnx.ModelProto, folder: Path, config: dict | None = None) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    if config is not None:
        (folder.parent / "config.json").write_text(json.dumps(config))
    return folder / "model.onnx"


def linear(
    folder: Path,
    in_type: int,
    weight: np.ndarray,
    config: dict | None = None,
    input_name: str = "features",
    output_name: str = "scores",
) -> Path:
    """``scores = cast(features, weight.dtype) @ weight``: [N, F] in (in_type), [N, K] out."""
    f, k = weight.shape
    out_type = helper.np_dtype_to_tensor_dtype(weight.dtype)
    nodes = [
        helper.make_node("Cast", [input_name], ["x"], to=out_type),
        helper.make_node("MatMul", ["x", "w"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info(input_name, in_type, ["batch", f])],
        [helper.make_tensor_value_info(output_name, out_type, ["batch", k])],
        [numpy_helper.from_array(weight, "w")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), folder, config)


def slow(folder: Path, width: int = 1024, depth: int = 24, config: dict | None = None) -> Path:
    """[N, width] -> [N, width]: ``depth`` chained MatMul+Tanh with one shared weight.

    The weight is scaled so values stay bounded; each row costs ``depth * width**2`` MACs.
    """
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        previous = f"t{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(weight, "w")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), folder, config)


def gather(folder: Path, config: dict | None = None) -> Path:
    """[N, 4] float indices into a 10-entry table; an index outside 0..9 fails the whole batch."""
    table = np.arange(10, dtype=np.float32) * 10
    nodes = [
        helper.make_node("Cast", ["index"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "i"], ["value"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(table, "table")],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), folder, config)
