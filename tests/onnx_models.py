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


def endless(folder: Path, config: dict | None = None) -> Path:
    """[N, 1] -> [N, 1], ``y = x``, after a loop of ``max(x) * 10**12`` empty turns.

    Zeros (what a load warms up with) return at once; a positive value keeps the runtime busy
    for as good as ever: a model call that never returns, with no hook in the server.
    """
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["turns_in", "one"], ["turns_out"]),
        ],
        "turn",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("turns_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("turns_out", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
        helper.make_node("Mul", ["largest", "scale"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "true", "zero"], ["turns"], body=body),
        helper.make_node("Mul", ["turns", "zero"], ["nothing"]),
        helper.make_node("Add", ["x", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [
            numpy_helper.from_array(np.array(1e12, np.float32), "scale"),
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=OPSET), folder, config)
