"""Conv building blocks shared by backbones and heads: one place to build a conv, so a conv-level option
(weight standardization) has one home later."""

from __future__ import annotations

from torch import nn

from orchestrator.models.catalog import NormSpec
from orchestrator.models.norms import make_norm


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    """A conv padded so that the output is input / stride; no bias by default (a norm follows)."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias
    )


def conv_norm_relu(
    in_channels: int, out_channels: int, kernel_size: int, *, norm: str | NormSpec, dilation: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, dilation=dilation),
        make_norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


def init_conv_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, as torchvision's ResNet) for every conv, zero conv biases.

    Norm layers keep their own init (weight 1, bias 0).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
