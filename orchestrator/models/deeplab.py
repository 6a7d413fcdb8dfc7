"""DeepLab heads on the backbone features {"low", "out"}:

- `DeepLabV3PlusHead` (Chen et al., ECCV 2018): ASPP with depthwise-separable atrous convs and a decoder
  that fuses layer1 features with two separable 3x3 convs; logits at the low-level stride (4).
- `DeepLabV3Head` (Chen et al., 2017, "Rethinking Atrous Convolution"): ASPP with plain atrous convs, as
  that paper (and torchvision's deeplabv3), then the classifier; logits at the output stride.

The model upsamples the logits to the input size (`build.SegmentationModel`). With `+ws`, the conv factory
standardizes every conv followed by a norm but the separable convs' depthwise ones; the classifier and the
image-pooling conv (no norm after them) stay plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec, check_output_stride, parse_norm
from orchestrator.models.layers import (
    classifier,
    conv,
    conv_norm_act,
    init_conv_weights,
    separable_conv_norm_act,
)
from orchestrator.models.norms import make_act

ASPP_RATES_OS16 = (6, 12, 18)  # doubled at output stride 8, where the features are twice as large


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    check_output_stride(output_stride)
    return tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 atrous branch per rate (depthwise-separable
    if `separable`), image pooling; concatenated and projected to `channels` by a 1x1 conv."""

    def __init__(
        self,
        in_channels: int,
        *,
        rates: tuple[int, ...],
        norm: NormSpec,
        separable: bool,
        channels: int = 256,
    ) -> None:
        super().__init__()
        atrous = [
            separable_conv_norm_act(in_channels, channels, norm=norm, dilation=r)
            if separable
            else conv_norm_act(in_channels, channels, 3, norm=norm, dilation=r)
            for r in rates
        ]
        self.branches = nn.ModuleList([conv_norm_act(in_channels, channels, 1, norm=norm), *atrous])
        # Image pooling works on a 1x1 map: a BN there sees one value per channel at batch 1 per GPU, as the
        # study runs ("Expected more than 1 value per channel when training"). So this branch is a biased conv
        # without a norm, for every norm spec, so that the head's architecture does not vary with the norm.
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv(in_channels, channels, 1, bias=True), make_act(norm, channels)
        )
        self.project = conv_norm_act(channels * (len(rates) + 2), channels, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """Features {"low", "out"} -> logits [B, num_classes, H/4, W/4]."""

    def __init__(
        self,
        low_channels: int,
        in_channels: int,
        num_classes: int,
        *,
        norm: str | NormSpec = "bn",
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        norm = parse_norm(norm)
        self.aspp = ASPP(in_channels, rates=aspp_rates(output_stride), norm=norm, separable=True)
        self.low_project = conv_norm_act(low_channels, 48, 1, norm=norm)
        self.fuse = nn.Sequential(
            separable_conv_norm_act(256 + 48, 256, norm=norm), separable_conv_norm_act(256, 256, norm=norm)
        )
        init_conv_weights(self)
        self.classifier = classifier(256, num_classes)  # after init_conv_weights: keeps its small init

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        low = self.low_project(features["low"])
        context = F.interpolate(
            self.aspp(features["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.classifier(self.fuse(torch.cat([context, low], dim=1)))


class DeepLabV3Head(nn.Module):
    """Features {"out"} -> logits [B, num_classes, H/output_stride, W/output_stride].

    `low_channels` is unused: every head takes the same arguments, so that `build_model` builds any of them.
    """

    def __init__(
        self,
        low_channels: int,
        in_channels: int,
        num_classes: int,
        *,
        norm: str | NormSpec = "bn",
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates=aspp_rates(output_stride), norm=parse_norm(norm), separable=False)
        init_conv_weights(self)
        self.classifier = classifier(256, num_classes)  # after init_conv_weights: keeps its small init

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.aspp(features["out"]))
