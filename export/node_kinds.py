"""What each node of a traced classifier is, as far as turning its head into convolutions goes.

Element-wise layers, flattens, means over the spatial axes, permutations to and from
channels-last, adaptive pooling and channel LayerNorms are told apart here; the rewriting itself
is :mod:`export.fc_to_conv`'s.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from .errors import ExportError

__all__ = [
    "SHAPE_QUERIES",
    "ConversionError",
    "NodeKinds",
    "describe",
    "prod",
    "shape_of",
]


class ConversionError(ExportError):
    """The network's head cannot be re-expressed as convolutions; the message names the layer."""


# Modules and functions that act on each value (or each channel) independently, so they mean the
# same on an [N, F] vector and on an [N, F, *cells] map.
_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.PReLU,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.hardswish,
    torch.nn.functional.hardsigmoid,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.dropout,
    torch.nn.functional.elu,
    operator.mul,
    operator.add,
    operator.truediv,
    operator.sub,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
# Tensor methods that only read a shape, such as x.size(0) in x.view(x.size(0), -1).
SHAPE_QUERIES = {"size", "dim"}
_MEAN_CALLS: set[Any] = {torch.mean}
_FLATTEN_CALLS: set[Any] = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_ADAPTIVE_POOL_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_ADAPTIVE_POOL_FUNCTIONS: dict[Any, str] = {
    torch.nn.functional.adaptive_avg_pool1d: "avg",
    torch.nn.functional.adaptive_avg_pool2d: "avg",
    torch.nn.functional.adaptive_max_pool1d: "max",
    torch.nn.functional.adaptive_max_pool2d: "max",
}


def shape_of(node: Any) -> tuple[int, ...]:
    """The shape shape propagation recorded for ``node`` at the training window.

    Raises:
        ConversionError: the node has no single tensor output.
    """
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise ConversionError(f"layer {node} has no single tensor output; cannot follow its shape")
    return tuple(int(d) for d in meta.shape)


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The layer's name and kind, for messages and the export log."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_method":
        return f"'{node.name}' (tensor.{node.target})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def prod(values: tuple[int, ...]) -> int:
    """The product of ``values`` (1 for none)."""
    result = 1
    for v in values:
        result *= v
    return result


class NodeKinds:
    """Tells the nodes of one traced graph apart; knows which maps are channels-last.

    Args:
        gm: the traced network, with shapes propagated at the training window.
        ndim: spatial axes of its input (1 or 2).
    """

    def __init__(self, gm: fx.GraphModule, ndim: int) -> None:
        self.gm = gm
        self.ndim = ndim
        self.modules = dict(gm.named_modules())
        # Maps permuted to [N, *spatial, C]; the rewriter adds each one as it walks the graph.
        self.channels_last: set[fx.Node] = set()

    def is_flatten(self, node: fx.Node) -> bool:
        """A flatten of a whole ``[N, C, *spatial]`` map to ``[N, F]``, in any of its spellings."""
        if node.op == "call_module":
            return isinstance(self.modules[str(node.target)], nn.Flatten)
        if not (
            (node.op == "call_function" and node.target in _FLATTEN_CALLS)
            or (node.op == "call_method" and node.target in _FLATTEN_METHODS)
        ):
            return False
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return False
        before, after = shape_of(source), shape_of(node)
        return len(before) == self.ndim + 2 and len(after) == 2 and after[1] == prod(before[1:])

    def is_spatial_mean(self, node: fx.Node) -> bool:
        """``x.mean(dims)`` over exactly the spatial axes of a map, without keepdim: [N, C]."""
        if not (
            (node.op == "call_function" and node.target in _MEAN_CALLS)
            or (node.op == "call_method" and node.target == "mean")
        ):
            return False
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(shape_of(source)) != self.ndim + 2:
            return False
        if source in self.channels_last:  # its axes 2, 3 are not the spatial ones
            return False
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dims, int):
            dims = (dims,)
        if keepdim or not isinstance(dims, (list, tuple)):
            return False
        if not all(isinstance(d, int) for d in dims):
            return False
        rank = self.ndim + 2
        return sorted(d % rank for d in dims) == list(range(2, rank))

    def permutation(self, node: fx.Node) -> tuple[int, ...] | None:
        """The axes order of a permute node (``x.permute(0, 2, 3, 1)``, ``torch.permute``)."""
        if node.op == "call_method" and node.target == "permute":
            dims: Any = node.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
        elif node.op == "call_function" and node.target is torch.permute:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
        else:
            return None
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return None
        return tuple(d % len(dims) for d in dims)

    def per_position(self, node: fx.Node, inputs: list[fx.Node]) -> bool:
        """Whether ``node`` is a channels-last map: a permute to it, or a per-channel layer on one.

        On such a map, a Linear or a LayerNorm over the last axis (and anything element-wise)
        treats every position alone, so it needs no rewriting for a larger input.
        """
        rank = self.ndim + 2
        if self.permutation(node) == (0, *range(2, rank), 1):
            # Not back from channels-last: on a 1-D map, (0, 2, 1) goes both ways.
            source = node.args[0]
            return source not in self.channels_last and len(shape_of(source)) == rank
        if not any(a in self.channels_last for a in inputs):
            return False
        if self.is_pointwise(node) or self.normalised_shape(node) == 1:
            return True
        if node.op == "call_module":
            return isinstance(self.modules[str(node.target)], nn.Linear)
        return node.op == "call_function" and node.target is torch.nn.functional.linear

    def is_pointwise(self, node: fx.Node) -> bool:
        """Element-wise (or per-channel): the same on an ``[N, F]`` vector and on a map."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            return isinstance(module, _POINTWISE_MODULES)
        if node.op == "call_function":
            return node.target in _POINTWISE_FUNCTIONS and self._other_args_scalar(node)
        if node.op == "call_method":
            return node.target in _POINTWISE_METHODS
        return False

    def _other_args_scalar(self, node: fx.Node) -> bool:
        # x * 0.5 is per-value; x + y with y a second tensor is not something we can re-shape.
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        return len(tensors) == 1

    def adaptive_pool(self, node: fx.Node) -> tuple[str, tuple[int, ...]] | None:
        """Kind and output size of an adaptive pooling node, or None."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, _ADAPTIVE_POOL_MODULES):
                kind = "avg" if "Avg" in type(module).__name__ else "max"
                return kind, shape_of(node)[2:]
        if node.op == "call_function" and node.target in _ADAPTIVE_POOL_FUNCTIONS:
            return _ADAPTIVE_POOL_FUNCTIONS[node.target], shape_of(node)[2:]
        return None

    def pools_feeding_flatten(self) -> set[fx.Node]:
        """The adaptive poolings whose result the classifier's flatten reads (the head's pools).

        Element-wise layers and a channel LayerNorm may sit between the pooling and the flatten.
        """
        pools: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if not self.is_flatten(node):
                continue
            source = node.args[0]
            while isinstance(source, fx.Node) and (
                self.is_pointwise(source) or self.is_channel_norm_step(source)
            ):
                source = source.args[0]
            if isinstance(source, fx.Node) and self.adaptive_pool(source) is not None:
                pools.add(source)
        return pools

    def is_channel_norm_step(self, node: fx.Node) -> bool:
        """A step of a channel LayerNorm on a map: to channels-last, the norm, and back.

        ConvNeXt's head normalises its pooled map so (LayerNorm2d) before the flatten.
        """
        rank = self.ndim + 2
        order = self.permutation(node)
        if order is not None:
            return order in ((0, *range(2, rank), 1), (0, rank - 1, *range(1, rank - 1)))
        return self.normalised_shape(node) == 1

    def normalised_shape(self, node: fx.Node) -> int | None:
        """The axes a LayerNorm node normalises over (None: not a LayerNorm)."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            return len(module.normalized_shape) if isinstance(module, nn.LayerNorm) else None
        if node.op == "call_function" and node.target is torch.nn.functional.layer_norm:
            shape: Any = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            return len(shape)
        return None
