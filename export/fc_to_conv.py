"""Re-express a classifier's fully-connected head as convolutions (the dense variant).

The network is traced with ``torch.fx`` and shapes are propagated at the training window. Then:

* the flatten that feeds the classifier becomes an identity, remembering the feature map it used to
  flatten (channels ``C`` and spatial size ``S``);
* the first ``Linear`` after it becomes a convolution with kernel ``S`` and the same weights
  reshaped to ``[out, C, *S]``; later ones become 1x1 convolutions;
* the adaptive or global pooling that feeds that flatten becomes a fixed window with stride 1
  (a pooled map of size ``o`` from ``i`` becomes an ``i/o`` window, and the first converted
  convolution is dilated by ``i/o``), so the map keeps the feature stride and every cell equals
  the crop at its offset;
* a mean over every spatial axis (``x.mean((2, 3))``, pooling and flatten in one, as in
  ShuffleNet) becomes an average over the whole feature window with stride 1, its result the map;
* element-wise layers between them (ReLU, Dropout, Hardswish, BatchNorm1d, ...) carry over.

Layers that act on the channels of each position alone stay as they are, wherever they sit: a
``Linear`` or ``LayerNorm`` over the last axis of a map permuted to channels-last (ConvNeXt's
blocks and its head's LayerNorm2d) means the same on a map of any size.

Pooling that does not feed the classifier (squeeze-and-excitation blocks, for instance) stays
global over the whole input: the dense map is then approximate, which the export measures.
Anything else on the classifier path is a :class:`ConversionError` naming the layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ExportError

__all__ = ["ConversionError", "DenseModule", "to_dense"]

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
_SHAPE_QUERIES = {"size", "dim"}
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


class ConversionError(ExportError):
    """The network's head cannot be re-expressed as convolutions; the message names the layer."""


@dataclass(frozen=True)
class _Flat:
    """A value that the original network holds as ``[N, F]`` and the dense one as a map."""

    channels: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]


@dataclass
class DenseModule:
    """The result of :func:`to_dense`.

    Attributes:
        module: the dense network, ``[N, C, *window]`` in, ``[N, K, *cells]`` out.
        converted: one line per rewritten layer, for the export log.
        global_pools: layers left as whole-input pooling (the map is then approximate).
    """

    module: fx.GraphModule
    converted: list[str] = field(default_factory=list)
    global_pools: list[str] = field(default_factory=list)


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise ConversionError(f"layer {node} has no single tensor output; cannot follow its shape")
    return tuple(int(d) for d in meta.shape)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_method":
        return f"'{node.name}' (tensor.{node.target})"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def _conv_class(ndim: int) -> type[nn.Conv1d] | type[nn.Conv2d]:
    if ndim == 1:
        return nn.Conv1d
    if ndim == 2:
        return nn.Conv2d
    raise ConversionError(f"{ndim}-D feature maps are not supported (only Conv1d and Conv2d)")


class _Rewriter:
    """Walks the traced graph once, in order, and rewrites the classifier path."""

    def __init__(self, gm: fx.GraphModule, ndim: int) -> None:
        self.gm = gm
        self.ndim = ndim
        self.modules = dict(gm.named_modules())
        self.flat: dict[fx.Node, _Flat] = {}
        self.dilated: dict[fx.Node, tuple[int, ...]] = {}
        self.channels_last: set[fx.Node] = set()  # maps permuted to [N, *spatial, C]
        self.result = DenseModule(module=gm)
        self.head_pools = self._pools_feeding_flatten()

    # -- classification of nodes ------------------------------------------------------------
    def _is_flatten(self, node: fx.Node) -> bool:
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
        before, after = _shape(source), _shape(node)
        return len(before) == self.ndim + 2 and len(after) == 2 and after[1] == _prod(before[1:])

    def _is_spatial_mean(self, node: fx.Node) -> bool:
        """``x.mean(dims)`` over exactly the spatial axes of a map, without keepdim: [N, C]."""
        if not (
            (node.op == "call_function" and node.target in _MEAN_CALLS)
            or (node.op == "call_method" and node.target == "mean")
        ):
            return False
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(_shape(source)) != self.ndim + 2:
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

    def _permutation(self, node: fx.Node) -> tuple[int, ...] | None:
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

    def _per_position(self, node: fx.Node, inputs: list[fx.Node]) -> bool:
        """Whether ``node`` is a channels-last map: a permute to it, or a per-channel layer on one.

        On such a map, a Linear or a LayerNorm over the last axis (and anything element-wise)
        treats every position alone, so it needs no rewriting for a larger input.
        """
        rank = self.ndim + 2
        if self._permutation(node) == (0, *range(2, rank), 1):
            # Not back from channels-last: on a 1-D map, (0, 2, 1) goes both ways.
            source = node.args[0]
            return source not in self.channels_last and len(_shape(source)) == rank
        if not any(a in self.channels_last for a in inputs):
            return False
        if self._is_pointwise(node) or self._normalised_shape(node) == 1:
            return True
        if node.op == "call_module":
            return isinstance(self.modules[str(node.target)], nn.Linear)
        return node.op == "call_function" and node.target is torch.nn.functional.linear

    def _is_pointwise(self, node: fx.Node) -> bool:
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

    def _adaptive_pool(self, node: fx.Node) -> tuple[str, tuple[int, ...]] | None:
        """Kind and output size of an adaptive pooling node, or None."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, _ADAPTIVE_POOL_MODULES):
                kind = "avg" if "Avg" in type(module).__name__ else "max"
                return kind, _shape(node)[2:]
        if node.op == "call_function" and node.target in _ADAPTIVE_POOL_FUNCTIONS:
            return _ADAPTIVE_POOL_FUNCTIONS[node.target], _shape(node)[2:]
        return None

    def _pools_feeding_flatten(self) -> set[fx.Node]:
        pools: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if not self._is_flatten(node):
                continue
            source = node.args[0]
            while isinstance(source, fx.Node) and (
                self._is_pointwise(source) or self._is_channel_norm_step(source)
            ):
                source = source.args[0]
            if isinstance(source, fx.Node) and self._adaptive_pool(source) is not None:
                pools.add(source)
        return pools

    def _is_channel_norm_step(self, node: fx.Node) -> bool:
        """A step of a channel LayerNorm on a map: to channels-last, the norm, and back.

        ConvNeXt's head normalises its pooled map so (LayerNorm2d) before the flatten.
        """
        rank = self.ndim + 2
        order = self._permutation(node)
        if order is not None:
            return order in ((0, *range(2, rank), 1), (0, rank - 1, *range(1, rank - 1)))
        return self._normalised_shape(node) == 1

    def _normalised_shape(self, node: fx.Node) -> int | None:
        """The axes a LayerNorm node normalises over (None: not a LayerNorm)."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            return len(module.normalized_shape) if isinstance(module, nn.LayerNorm) else None
        if node.op == "call_function" and node.target is torch.nn.functional.layer_norm:
            shape: Any = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            return len(shape)
        return None

    # -- rewriting ------------------------------------------------------------------------------
    def run(self) -> DenseModule:
        for node in list(self.gm.graph.nodes):
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                self._check_output(node)
                continue
            self._visit(node)
        self.gm.graph.eliminate_dead_code()
        self.gm.graph.lint()
        self.gm.recompile()
        if not self.result.converted:
            raise ConversionError(
                "found no flatten followed by a Linear layer: the network has no fully-connected "
                "head to convert (export it with --no-dense if it is already fully convolutional)"
            )
        return self.result

    def _visit(self, node: fx.Node) -> None:
        if node.op == "call_method" and node.target in _SHAPE_QUERIES:
            return  # x.size(0) in x.view(x.size(0), -1): gone with the flatten it served
        inputs = list(node.all_input_nodes)
        flat_inputs = [a for a in inputs if a in self.flat]
        dilated_inputs = [a for a in inputs if a in self.dilated]
        if flat_inputs:
            self._visit_flat(node, flat_inputs)
        elif node in self.head_pools:
            self._replace_head_pool(node)
        elif self._is_flatten(node):
            self._replace_flatten(node, dilated_inputs)
        elif self._is_spatial_mean(node) and not dilated_inputs:
            self._replace_spatial_mean(node)
        elif dilated_inputs:
            if not self._is_pointwise(node):
                raise ConversionError(
                    f"layer {_describe(node, self.modules)} sits between the classifier's pooling "
                    "and its flatten; only element-wise layers may sit there"
                )
            self.dilated[node] = self.dilated[dilated_inputs[0]]
        else:
            self._visit_map(node, inputs)

    def _visit_map(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        """A layer off the classifier path: kept as it is, unless it cannot mean the same."""
        if self._adaptive_pool(node) is not None:
            self.result.global_pools.append(_describe(node, self.modules))
        elif self._per_position(node, inputs):
            self.channels_last.add(node)
        elif node.op == "call_module" and isinstance(self.modules[str(node.target)], nn.Linear):
            raise ConversionError(
                f"layer {_describe(node, self.modules)} is applied to an unflattened "
                f"{list(_shape(node.args[0]))} tensor (found no flatten before it): "
                "cannot express it as a convolution"
            )

    def _visit_flat(self, node: fx.Node, flat_inputs: list[fx.Node]) -> None:
        state = self.flat[flat_inputs[0]]
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, nn.Linear):
                self.flat[node] = self._replace_linear(node, module, state)
                return
            if isinstance(module, nn.BatchNorm1d):
                self._replace_batchnorm(node, module)
                self.flat[node] = state
                return
        if self._is_pointwise(node) and len(flat_inputs) == 1:
            self.flat[node] = state
            return
        raise ConversionError(
            f"layer {_describe(node, self.modules)} follows the flatten but is neither a Linear "
            "layer nor element-wise: cannot express the head as convolutions"
        )

    def _check_output(self, node: fx.Node) -> None:
        result = node.args[0]
        if not isinstance(result, fx.Node):
            raise ConversionError("the network returns several values; expected one logits tensor")
        if result not in self.flat:
            return
        state = self.flat[result]
        if any(k != 1 for k in state.kernel):
            raise ConversionError(
                "the network's output is its flattened feature map with no Linear layer after it"
            )

    def _replace_head_pool(self, node: fx.Node) -> None:
        pool = self._adaptive_pool(node)
        assert pool is not None
        kind, out_size = pool
        in_size = _shape(node.all_input_nodes[0])[2:]
        for axis, (i, o) in enumerate(zip(in_size, out_size, strict=True)):
            if i % o:
                raise ConversionError(
                    f"layer {_describe(node, self.modules)} pools a {i}-wide feature map to {o} "
                    f"along axis {axis}: not a whole window, so it has no fixed-window equivalent "
                    "(choose an input size whose feature map divides evenly)"
                )
        window = tuple(i // o for i, o in zip(in_size, out_size, strict=True))
        global_pool = all(o == 1 for o in out_size)
        source = node.all_input_nodes[0]
        if all(w == 1 for w in window):
            node.replace_all_uses_with(source)
            self.gm.graph.erase_node(node)
            self.result.converted.append(f"{_describe(node, self.modules)} -> identity")
            return
        size = tuple(in_size) if global_pool else window
        pool_module = _fixed_pool(kind, size, self.ndim)
        new = self._swap_for_pool(node, source, pool_module)
        new.meta = dict(node.meta)
        if not global_pool:
            self.dilated[new] = window
        self.result.converted.append(
            f"{_describe(node, self.modules)} -> {type(pool_module).__name__}"
            f"(kernel={list(size)}, stride=1)"
        )

    def _swap_for_pool(self, node: fx.Node, source: fx.Node, pool: nn.Module) -> fx.Node:
        """Put ``pool`` applied to ``source`` where ``node`` was; returns the new node."""
        name = f"dense_pool_{node.name}"
        self.gm.add_submodule(name, pool)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (source,))
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        return new

    def _replace_flatten(self, node: fx.Node, dilated_inputs: list[fx.Node]) -> None:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        if source in self.channels_last:
            raise ConversionError(
                f"layer {_describe(node, self.modules)} flattens a channels-last map: its "
                "features are in an order no convolution over the channels-first map reads"
            )
        before = _shape(source)
        dilation = self.dilated[dilated_inputs[0]] if dilated_inputs else (1,) * self.ndim
        node.replace_all_uses_with(source)
        self.gm.graph.erase_node(node)
        # The flattened value is now the map itself; later layers look it up by its source.
        self.flat[source] = _Flat(channels=before[1], kernel=before[2:], dilation=dilation)
        self.result.converted.append(f"'{node.name}' (flatten of {list(before[1:])}) -> identity")

    def _replace_spatial_mean(self, node: fx.Node) -> None:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        before = _shape(source)
        pool_module = _fixed_pool("avg", before[2:], self.ndim)
        new = self._swap_for_pool(node, source, pool_module)
        ones = (1,) * self.ndim
        self.flat[new] = _Flat(channels=before[1], kernel=ones, dilation=ones)
        self.result.converted.append(
            f"{_describe(node, self.modules)} (mean over {list(before[2:])}) -> "
            f"{type(pool_module).__name__}(kernel={list(before[2:])}, stride=1)"
        )

    def _replace_linear(self, node: fx.Node, linear: nn.Linear, state: _Flat) -> _Flat:
        expected = state.channels * _prod(state.kernel)
        if linear.in_features != expected:
            raise ConversionError(
                f"layer {_describe(node, self.modules)} takes {linear.in_features} features but "
                f"the flattened map has {expected} ({state.channels}x{state.kernel})"
            )
        conv = _conv_class(self.ndim)(
            state.channels,
            linear.out_features,
            kernel_size=state.kernel,  # type: ignore[arg-type]
            dilation=state.dilation,  # type: ignore[arg-type]
            bias=linear.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(linear.weight.reshape(conv.weight.shape))
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)  # type: ignore[union-attr]
        self.gm.delete_submodule(str(node.target))
        self.gm.add_submodule(str(node.target), conv)
        self.result.converted.append(
            f"'{node.target}' (Linear {linear.in_features}->{linear.out_features}) -> "
            f"{type(conv).__name__}(kernel={list(state.kernel)}, dilation={list(state.dilation)})"
        )
        return _Flat(
            channels=linear.out_features, kernel=(1,) * self.ndim, dilation=(1,) * self.ndim
        )

    def _replace_batchnorm(self, node: fx.Node, norm: nn.BatchNorm1d) -> None:
        if self.ndim == 1:
            return  # BatchNorm1d already accepts [N, C, L].
        replacement = nn.BatchNorm2d(
            norm.num_features,
            eps=norm.eps,
            affine=norm.affine,
            track_running_stats=norm.track_running_stats,
        )
        replacement.load_state_dict(norm.state_dict())
        replacement.eval()
        self.gm.delete_submodule(str(node.target))
        self.gm.add_submodule(str(node.target), replacement)
        self.result.converted.append(f"'{node.target}' (BatchNorm1d) -> BatchNorm2d")


def _prod(values: tuple[int, ...]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _fixed_pool(kind: str, size: tuple[int, ...], ndim: int) -> nn.Module:
    pools: dict[tuple[str, int], Any] = {
        ("avg", 1): nn.AvgPool1d,
        ("max", 1): nn.MaxPool1d,
        ("avg", 2): nn.AvgPool2d,
        ("max", 2): nn.MaxPool2d,
    }
    module: nn.Module = pools[kind, ndim](size, stride=1)
    return module


def to_dense(model: nn.Module, input_shape: tuple[int, ...]) -> DenseModule:
    """Build the dense (fully convolutional) twin of a classifier, sharing no state with it.

    Args:
        model: a classifier whose forward maps ``[N, C, *window]`` to ``[N, K]`` logits.
        input_shape: ``(C, H, W)`` or ``(C, L)``: the window the classifier was built for.

    Returns:
        The dense network and a log of what was rewritten.

    Raises:
        ConversionError: the network cannot be traced, or a layer on its classifier path has no
            convolutional equivalent (the message names it and says why).
    """
    import copy

    ndim = len(input_shape) - 1
    _conv_class(ndim)
    source = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(source)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise ConversionError(
            f"{type(model).__name__} does not run on a 1x{'x'.join(map(str, input_shape))} "
            f"input ({type(exc).__name__}: {exc})"
        ) from exc
    dense = _Rewriter(gm, ndim).run()
    dense.module.eval()
    return dense
