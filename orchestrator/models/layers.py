"""Conv building blocks shared by backbones and heads: one place to build a conv, so that which convs are
weight-standardized is decided in one place (`conv`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec
from orchestrator.models.norms import norm_act


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    norm: NormSpec | None = None,
) -> nn.Conv2d:
    """A conv padded so that the output is input / stride; no bias by default (a norm follows).

    `norm`: the spec of the norm this conv feeds, None where none does (a classifier, a pooled branch). It
    decides Weight Standardization, here and nowhere else: a `+ws` spec makes the conv a StdConv2d, except a
    depthwise one, whose standardized single-channel filter would sum to zero (a high-pass filter that cannot
    pass its channel's mean). A conv no norm follows stays plain: WS fixes a conv's output scale, which only
    a norm after it makes learnable again (the WS paper standardizes the convs before BN/GN).
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    depthwise = groups == in_channels > 1
    standardized = norm is not None and norm.ws and not depthwise
    return (StdConv2d if standardized else nn.Conv2d)(
        in_channels,
        out_channels,
        (kh, kw),
        stride=stride,
        padding=(dilation * (kh - 1) // 2, dilation * (kw - 1) // 2),
        dilation=dilation,
        groups=groups,
        bias=bias,
    )


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization (Qiao et al., 2019): each output channel's weight is standardized to
    zero mean and unit variance over (in, kh, kw) in every forward; no affine, since a norm follows.

    Same parameter names as Conv2d (`weight`, `bias`), so torchvision weights load into it.
    """

    # Inside the sqrt. The paper adds 1e-5 to the std; with weights of variance ~1e-4..1e-3 (Kaiming init,
    # ImageNet weights) 1e-5 inside the sqrt would shrink them by up to 5%, 1e-6 by at most 0.5%.
    eps = 1e-6

    def standardized_weight(self) -> Tensor:
        # layer_norm over each output channel's row: one fused op; the naive mean/std form made a whole
        # training step 1.8x slower (ENVIRONMENT.md).
        w = self.weight
        std = F.layer_norm(w.reshape(w.shape[0], -1), (w[0].numel(),), eps=self.eps).reshape_as(w)
        if std.stride() != w.stride():  # channels_last weights: the conv output follows their layout
            std = torch.empty_like(w).copy_(std)
        return std

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    norm: NormSpec,
    act: str = "relu",
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    """conv -> norm -> activation (`norms.norm_act`: `act`, or the norm's own), indices 0, 1, 2."""
    return nn.Sequential(
        conv(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            dilation=dilation,
            groups=groups,
            norm=norm,
        ),
        *norm_act(norm, out_channels, act),
    )


def separable_conv_norm_act(
    in_channels: int, out_channels: int, *, norm: NormSpec, dilation: int = 1
) -> nn.Sequential:
    """DeepLabv3+'s depthwise-separable 3x3 conv: depthwise 3x3 (atrous) + norm + ReLU, then pointwise
    1x1 + norm + ReLU (Chen et al., ECCV 2018, Sec. 3.2). One flat Sequential: index 0 is the depthwise conv.
    """
    return nn.Sequential(
        *conv_norm_act(in_channels, in_channels, 3, norm=norm, dilation=dilation, groups=in_channels),
        *conv_norm_act(in_channels, out_channels, 1, norm=norm),
    )


def classifier(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A head's last layer: a biased 1x1 conv with small weights, plain (no norm follows it)."""
    layer = conv(in_channels, num_classes, 1, bias=True)
    # Kaiming fan-out on a 3-output 1x1 conv gives logits with std ~9 at init (a first loss ~6);
    # small weights start the classifier near uniform, where cross-entropy is ln(3).
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


def init_conv_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, as torchvision's ResNet) for every conv, zero conv biases.

    Norm layers keep their own init (weight 1, bias 0). Meta tensors (`orchestrator plan`) hold no values to
    draw, and drawing them still runs torch's Python reference of normal_, conv by conv.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def dilation_plan(strides: Sequence[int], reduction: int, output_stride: int) -> list[tuple[int, int, int]]:
    """For stages (or blocks) of `strides` after a stem that reduces by `reduction`: (stride, the dilation
    before the stage, the dilation in it). A stride that would take the features past `output_stride`
    dilates instead (DeepLab): the stage keeps stride 1 and its convs after the first dilate by the
    stride's factor more. Where the stage's first conv takes the dilation before (torchvision's ResNet, the
    aligned Xception) or the one in it (the WiderResNet reference) is the backbone's choice."""
    plan, dilation = [], 1
    for stride in strides:
        before = dilation
        if reduction * stride > output_stride:
            dilation, stride = dilation * stride, 1
        reduction *= stride
        plan.append((stride, before, dilation))
    return plan
