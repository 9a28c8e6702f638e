"""Re-express a classifier's fully-connected head as convolutions (the dense variant).

The network is traced with ``torch.fx`` and shapes are propagated at the training window. Then:

* the flatten that feeds the classifier becomes an identity, remembering the feature map it
  flattens (channels ``C`` and spatial size ``S``);
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

Which node is which is :mod:`export.node_kinds`'s to tell; the replacement layers are built by
:mod:`export.dense_layers`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .dense_layers import batchnorm_2d, conv_class, fixed_pool, linear_as_conv
from .node_kinds import SHAPE_QUERIES, ConversionError, NodeKinds, describe, prod, shape_of

__all__ = ["ConversionError", "DenseModule", "to_dense"]


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


class _Rewriter:
    """Walks the traced graph once, in order, and rewrites the classifier path."""

    def __init__(self, gm: fx.GraphModule, ndim: int) -> None:
        self.gm = gm
        self.ndim = ndim
        self.kinds = NodeKinds(gm, ndim)
        self.modules = self.kinds.modules
        self.flat: dict[fx.Node, _Flat] = {}
        self.dilated: dict[fx.Node, tuple[int, ...]] = {}
        self.channels_last = self.kinds.channels_last  # maps permuted to [N, *spatial, C]
        self.result = DenseModule(module=gm)
        self.head_pools = self.kinds.pools_feeding_flatten()

    def run(self) -> DenseModule:
        """Rewrite the graph in place and recompile it; the dense module and its log."""
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
        if node.op == "call_method" and node.target in SHAPE_QUERIES:
            return  # x.size(0) in x.view(x.size(0), -1): gone with the flatten it served
        inputs = list(node.all_input_nodes)
        flat_inputs = [a for a in inputs if a in self.flat]
        dilated_inputs = [a for a in inputs if a in self.dilated]
        if flat_inputs:
            self._visit_flat(node, flat_inputs)
        elif node in self.head_pools:
            self._replace_head_pool(node)
        elif self.kinds.is_flatten(node):
            self._replace_flatten(node, dilated_inputs)
        elif self.kinds.is_spatial_mean(node) and not dilated_inputs:
            self._replace_spatial_mean(node)
        elif dilated_inputs:
            if not self.kinds.is_pointwise(node):
                raise ConversionError(
                    f"layer {describe(node, self.modules)} sits between the classifier's pooling "
                    "and its flatten; only element-wise layers may sit there"
                )
            self.dilated[node] = self.dilated[dilated_inputs[0]]
        else:
            self._visit_map(node, inputs)

    def _visit_map(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        """A layer off the classifier path: kept as it is, unless it cannot mean the same."""
        if self.kinds.adaptive_pool(node) is not None:
            self.result.global_pools.append(describe(node, self.modules))
        elif self.kinds.per_position(node, inputs):
            self.channels_last.add(node)
        elif node.op == "call_module" and isinstance(self.modules[str(node.target)], nn.Linear):
            raise ConversionError(
                f"layer {describe(node, self.modules)} is applied to an unflattened "
                f"{list(shape_of(node.args[0]))} tensor (found no flatten before it): "
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
        if self.kinds.is_pointwise(node) and len(flat_inputs) == 1:
            self.flat[node] = state
            return
        raise ConversionError(
            f"layer {describe(node, self.modules)} follows the flatten but is neither a Linear "
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
        pool = self.kinds.adaptive_pool(node)
        assert pool is not None
        kind, out_size = pool
        in_size = shape_of(node.all_input_nodes[0])[2:]
        for axis, (i, o) in enumerate(zip(in_size, out_size, strict=True)):
            if i % o:
                raise ConversionError(
                    f"layer {describe(node, self.modules)} pools a {i}-wide feature map to {o} "
                    f"along axis {axis}: not a whole window, so it has no fixed-window equivalent "
                    "(choose an input size whose feature map divides evenly)"
                )
        window = tuple(i // o for i, o in zip(in_size, out_size, strict=True))
        global_pool = all(o == 1 for o in out_size)
        source = node.all_input_nodes[0]
        if all(w == 1 for w in window):
            node.replace_all_uses_with(source)
            self.gm.graph.erase_node(node)
            self.result.converted.append(f"{describe(node, self.modules)} -> identity")
            return
        size = tuple(in_size) if global_pool else window
        pool_module = fixed_pool(kind, size, self.ndim)
        new = self._swap_for_pool(node, source, pool_module)
        new.meta = dict(node.meta)
        if not global_pool:
            self.dilated[new] = window
        self.result.converted.append(
            f"{describe(node, self.modules)} -> {type(pool_module).__name__}"
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
                f"layer {describe(node, self.modules)} flattens a channels-last map: its "
                "features are in an order no convolution over the channels-first map reads"
            )
        before = shape_of(source)
        dilation = self.dilated[dilated_inputs[0]] if dilated_inputs else (1,) * self.ndim
        node.replace_all_uses_with(source)
        self.gm.graph.erase_node(node)
        # From here on the flattened value is the map itself; later layers look it up by its
        # source.
        self.flat[source] = _Flat(channels=before[1], kernel=before[2:], dilation=dilation)
        self.result.converted.append(f"'{node.name}' (flatten of {list(before[1:])}) -> identity")

    def _replace_spatial_mean(self, node: fx.Node) -> None:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        before = shape_of(source)
        pool_module = fixed_pool("avg", before[2:], self.ndim)
        new = self._swap_for_pool(node, source, pool_module)
        ones = (1,) * self.ndim
        self.flat[new] = _Flat(channels=before[1], kernel=ones, dilation=ones)
        self.result.converted.append(
            f"{describe(node, self.modules)} (mean over {list(before[2:])}) -> "
            f"{type(pool_module).__name__}(kernel={list(before[2:])}, stride=1)"
        )

    def _replace_linear(self, node: fx.Node, linear: nn.Linear, state: _Flat) -> _Flat:
        expected = state.channels * prod(state.kernel)
        if linear.in_features != expected:
            raise ConversionError(
                f"layer {describe(node, self.modules)} takes {linear.in_features} features but "
                f"the flattened map has {expected} ({state.channels}x{state.kernel})"
            )
        conv = linear_as_conv(linear, state.channels, state.kernel, state.dilation)
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
        replacement = batchnorm_2d(norm)
        self.gm.delete_submodule(str(node.target))
        self.gm.add_submodule(str(node.target), replacement)
        self.result.converted.append(f"'{node.target}' (BatchNorm1d) -> BatchNorm2d")


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
    ndim = len(input_shape) - 1
    conv_class(ndim)  # refuses anything but 1-D and 2-D inputs before tracing
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
