"""The layers the dense network gets in place of the classifier's: convolutions and fixed pools."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .node_kinds import ConversionError

__all__ = ["batchnorm_2d", "conv_class", "fixed_pool", "linear_as_conv"]


def conv_class(ndim: int) -> type[nn.Conv1d] | type[nn.Conv2d]:
    """The convolution for maps of ``ndim`` spatial axes.

    Raises:
        ConversionError: ``ndim`` is neither 1 nor 2.
    """
    if ndim == 1:
        return nn.Conv1d
    if ndim == 2:
        return nn.Conv2d
    raise ConversionError(f"{ndim}-D feature maps are not supported (only Conv1d and Conv2d)")


def fixed_pool(kind: str, size: tuple[int, ...], ndim: int) -> nn.Module:
    """An ``avg`` or ``max`` pooling over a fixed ``size`` window with stride 1."""
    pools: dict[tuple[str, int], Any] = {
        ("avg", 1): nn.AvgPool1d,
        ("max", 1): nn.MaxPool1d,
        ("avg", 2): nn.AvgPool2d,
        ("max", 2): nn.MaxPool2d,
    }
    module: nn.Module = pools[kind, ndim](size, stride=1)
    return module


def linear_as_conv(
    linear: nn.Linear, channels: int, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> nn.Conv1d | nn.Conv2d:
    """A convolution computing ``linear`` on every ``channels x kernel`` window of a map.

    The Linear's weights, read as ``[out, channels, *kernel]`` (the order a flatten of a
    channels-first map gives its features), become the kernel.
    """
    conv = conv_class(len(kernel))(
        channels,
        linear.out_features,
        kernel_size=kernel,  # type: ignore[arg-type]
        dilation=dilation,  # type: ignore[arg-type]
        bias=linear.bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(conv.weight.shape))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)  # type: ignore[union-attr]
    return conv


def batchnorm_2d(norm: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """``norm``'s statistics and affine weights, applied per channel of a 2-D map."""
    replacement = nn.BatchNorm2d(
        norm.num_features,
        eps=norm.eps,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    replacement.load_state_dict(norm.state_dict())
    replacement.eval()
    return replacement
