"""Walk an ONNX classifier layer by layer: shapes, parameters, activations and sliding geometry.

One analysis serves both ``convserve inspect`` (the per-layer table) and ``convserve export``
(the dense stride, receptive field and the layers whose ``(W - F + 2P)/S + 1`` does not divide
evenly). It reads only the ONNX graph, so it describes exactly the file that will be served:
in an int8 (QDQ) file the quantized weights reached through ``DequantizeLinear`` are the
parameters, and the scales and zero points of the quantisation are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx
from onnx import shape_inference

__all__ = ["GraphGeometry", "Layer", "UnevenLayer", "analyse", "stored_precision"]

_SLIDING = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}
_GLOBAL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_FULLY_CONNECTED = {"Gemm", "MatMul"}
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
_QUANTISATION = {"QuantizeLinear", "DequantizeLinear"}


def stored_precision(model: onnx.ModelProto) -> str:
    """``int8`` for a quantized (QDQ) graph, ``fp16`` for half-precision weights, else ``fp32``."""
    if any(node.op_type in _QUANTISATION for node in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


@dataclass(frozen=True)
class Layer:
    """One row of the per-layer table.

    Attributes:
        name: the ONNX node name (or its output's name when the node has none).
        op: the ONNX operator.
        shape: output shape for one image, batch axis left out.
        params: weights this layer owns (float initializers it is the first to read, or
            quantized ones it reads through their DequantizeLinear).
        activations: output values per image counted as the CS231n notes count them (convolution,
            pooling and fully-connected outputs; 0 for other layers and identity pools).
        param_bytes: the bytes ``params`` take in the file.
    """

    name: str
    op: str
    shape: tuple[int, ...]
    params: int
    activations: int
    param_bytes: int = 0


@dataclass(frozen=True)
class UnevenLayer:
    """A layer whose window does not tile its input: its last pixels never reach the output.

    Attributes:
        name: node name.
        input_size: the layer's input extent per spatial axis (before padding).
        dropped: pixels of the layer's own input left out, per axis.
        dropped_input_pixels: the same in pixels of the network's input, per axis.
    """

    name: str
    input_size: tuple[int, ...]
    dropped: tuple[int, ...]
    dropped_input_pixels: tuple[int, ...]

    def describe(self) -> str:
        """One line for people."""

        def size(values: tuple[int, ...]) -> str:
            return "x".join(map(str, values))

        return (
            f"{self.name}: (W - F + 2P)/S + 1 is not whole at {size(self.input_size)}; the last "
            f"{size(self.dropped)} px of its input ({size(self.dropped_input_pixels)} px of the "
            "image) never reach the output"
        )


@dataclass
class GraphGeometry:
    """What :func:`analyse` finds.

    Attributes:
        input_name: the graph input.
        input_shape: the concrete input shape analysed, batch axis included.
        layers: rows of the per-layer table, input image first.
        stride: input pixels between neighbouring output positions, per spatial axis.
        receptive_field: input pixels that can influence one output position, per spatial axis
            (None once a global pooling or a flatten has mixed every position).
        padded: whether any sliding layer pads its input (then crops and the dense map differ at
            the borders).
        global_pooling: names of layers that pool over the whole input.
        uneven: layers whose geometry does not divide evenly.
        precision: what the weights are stored in (:func:`stored_precision`).
    """

    input_name: str
    input_shape: tuple[int, ...]
    layers: list[Layer] = field(default_factory=list)
    stride: tuple[int, ...] = ()
    receptive_field: tuple[int, ...] | None = ()
    padded: bool = False
    global_pooling: list[str] = field(default_factory=list)
    uneven: list[UnevenLayer] = field(default_factory=list)
    precision: str = "fp32"

    @property
    def total_params(self) -> int:
        """All weights of the graph."""
        return sum(layer.params for layer in self.layers)

    @property
    def total_param_bytes(self) -> int:
        """The bytes all weights take in the file."""
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def total_activations(self) -> int:
        """Activation values per image, input included."""
        return sum(layer.activations for layer in self.layers)


@dataclass
class _Reach:
    jump: tuple[int, ...]
    field: tuple[int, ...] | None


def _attr(node: onnx.NodeProto, name: str, default: list[int] | int | str) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _with_concrete_input(model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for tensor in fixed.graph.initializer:
        # Shapes need only the weights' dims; dropping their bytes makes inference ~100x faster.
        if tensor.data_type in _FLOAT_TYPES:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
    initializers = {t.name for t in fixed.graph.initializer}
    graph_input = next(i for i in fixed.graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ValueError(
            f"input '{graph_input.name}' has rank {len(dims)}; cannot analyse it at shape {shape}"
        )
    for dim, value in zip(dims, shape, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    return shape_inference.infer_shapes(fixed, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    values = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def _window(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto], ndim: int) -> list[int]:
    kernel: list[int] = list(_attr(node, "kernel_shape", []))  # type: ignore[call-overload]
    if not kernel and node.op_type in ("Conv", "ConvTranspose") and node.input[1] in weights:
        kernel = list(weights[node.input[1]].dims[2:])
    if len(kernel) != ndim:
        raise ValueError(f"cannot read the kernel of {node.name or node.op_type}")
    return kernel


def _pads(
    node: onnx.NodeProto, size: int, kernel: int, stride: int, axis: int, ndim: int
) -> tuple[int, int]:
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        small, large = total // 2, total - total // 2
        return (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    pads = list(_attr(node, "pads", [0] * 2 * ndim))  # type: ignore[call-overload]
    return pads[axis], pads[axis + ndim]


class _Walker:
    """One pass over the nodes in graph order, carrying each tensor's stride and field."""

    def __init__(self, model: onnx.ModelProto, input_shape: tuple[int, ...]) -> None:
        self.model = _with_concrete_input(model, input_shape)
        self.shapes = _shapes(self.model)
        self.weights = {t.name: t for t in self.model.graph.initializer}
        self.ndim = len(input_shape) - 2
        initializers = set(self.weights)
        name = next(i.name for i in self.model.graph.input if i.name not in initializers)
        self.result = GraphGeometry(
            input_name=name, input_shape=input_shape, precision=stored_precision(model)
        )
        self.reach = {name: _Reach((1,) * self.ndim, (1,) * self.ndim)}
        self.claimed: set[str] = set()
        self.dequantized: set[str] = set()
        self.result.layers.append(
            Layer("input", "Input", input_shape[1:], 0, math.prod(input_shape[1:]))
        )

    def run(self) -> GraphGeometry:
        for node in self.model.graph.node:
            self._visit(node)
        output = self.model.graph.output[0].name
        final = self.reach.get(output)
        if final is not None:
            self.result.stride = final.jump
            self.result.receptive_field = final.field
        return self.result

    def _params(self, node: onnx.NodeProto) -> tuple[int, int]:
        """The parameters ``node`` is the first to read, and the bytes they take."""
        if node.op_type in ("Identity", "DequantizeLinear") and node.input[0] in self.weights:
            # The exporter shares equal weights (zero biases of an untrained model) through
            # Identity nodes; each alias is a parameter of its own in the original network. A
            # quantized weight reaches its layer through its DequantizeLinear the same way.
            self.weights[node.output[0]] = self.weights[node.input[0]]
            if node.op_type == "DequantizeLinear":
                self.dequantized.add(node.output[0])
            return 0, 0
        if node.op_type in _QUANTISATION:
            return 0, 0  # scales and zero points describe a tensor; they are not weights
        count = size = 0
        for name in node.input:
            tensor = self.weights.get(name)
            if tensor is None or name in self.claimed:
                continue
            if tensor.data_type not in _FLOAT_TYPES and name not in self.dequantized:
                continue
            self.claimed.add(name)
            count += math.prod(tensor.dims)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            size += math.prod(tensor.dims) * itemsize
        return count, size

    def _visit(self, node: onnx.NodeProto) -> None:
        name = node.name or node.output[0]
        source: _Reach | None = next((self.reach[i] for i in node.input if i in self.reach), None)
        reach: _Reach | None
        if node.op_type in _SLIDING and source is not None:
            reach = self._slide(node, name, source)
        elif (
            node.op_type in _GLOBAL
            or node.op_type in ("Flatten", "Reshape")
            or (node.op_type in _FULLY_CONNECTED and not self._per_position(node))
        ):
            if node.op_type in _GLOBAL:
                self.result.global_pooling.append(name)
            reach = _Reach(source.jump, None) if source else None
        else:
            reach = self._merge(node)
        for output in node.output:
            if reach is not None:
                self.reach[output] = reach
        params, param_bytes = self._params(node)
        counted = node.op_type in _SLIDING | _GLOBAL | _FULLY_CONNECTED
        shape = self.shapes.get(node.output[0], ())
        pooling = node.op_type in _SLIDING | _GLOBAL and not node.op_type.startswith("Conv")
        if pooling and shape == self.shapes.get(node.input[0]):
            counted = False  # an identity pool (torchvision's adaptive pool at its own size)
        if counted or params:
            activations = math.prod(shape[1:]) if counted and shape else 0
            self.result.layers.append(
                Layer(name, node.op_type, shape[1:], params, activations, param_bytes)
            )

    def _per_position(self, node: onnx.NodeProto) -> bool:
        """Whether a MatMul acts on each position of a map alone, as a 1x1 convolution does.

        A Linear on a channels-last map (ConvNeXt's blocks) is a MatMul over its last axis.
        """
        return node.op_type == "MatMul" and len(self.shapes.get(node.input[0], ())) > 2

    def _merge(self, node: onnx.NodeProto) -> _Reach | None:
        sources = [self.reach[i] for i in node.input if i in self.reach]
        if not sources:
            return None
        fields = [s.field for s in sources]
        if any(f is None for f in fields):
            return _Reach(sources[0].jump, None)
        widest = tuple(max(f[a] for f in fields if f is not None) for a in range(self.ndim))
        return _Reach(sources[0].jump, widest)

    def _slide(self, node: onnx.NodeProto, name: str, source: _Reach) -> _Reach:
        kernel = _window(node, self.weights, self.ndim)
        strides = list(_attr(node, "strides", [1] * self.ndim))  # type: ignore[call-overload]
        dilations = list(_attr(node, "dilations", [1] * self.ndim))  # type: ignore[call-overload]
        ceil_mode = bool(_attr(node, "ceil_mode", 0))
        in_shape = self.shapes.get(node.input[0])
        jump, fields, dropped = [], [], []
        for axis in range(self.ndim):
            span = (kernel[axis] - 1) * dilations[axis] + 1
            jump.append(source.jump[axis] * strides[axis])
            if source.field is not None:
                fields.append(source.field[axis] + (span - 1) * source.jump[axis])
            if in_shape is not None:
                size = in_shape[2 + axis]
                begin, end = _pads(node, size, span, strides[axis], axis, self.ndim)
                self.result.padded |= bool(begin or end)
                dropped.append((size + begin + end - span) % strides[axis])
        if any(dropped) and not ceil_mode and node.op_type != "ConvTranspose" and in_shape:
            self.result.uneven.append(
                UnevenLayer(
                    name,
                    tuple(in_shape[2:]),
                    tuple(dropped),
                    tuple(d * j for d, j in zip(dropped, source.jump, strict=True)),
                )
            )
        return _Reach(tuple(jump), tuple(fields) if source.field is not None else None)


def analyse(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> GraphGeometry:
    """Analyse ``model`` at a concrete ``input_shape`` (batch axis included, e.g. (1, 3, 224, 224)).

    Raises:
        ValueError: the graph's input rank does not match, or a layer's kernel cannot be read.
    """
    return _Walker(model, input_shape).run()
