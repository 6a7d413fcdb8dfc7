"""DeepLabv3+ head (Chen et al., ECCV 2018): ASPP on the backbone output, a decoder fusing layer1 features.

Plain (not depthwise-separable) convs; logits come out at the low-level stride (4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import OUTPUT_STRIDES, NormSpec, parse_norm
from orchestrator.models.layers import conv, conv_norm_relu, init_conv_weights

ASPP_RATES_OS16 = (6, 12, 18)  # doubled at output stride 8, where the features are twice as large


class ASPP(nn.Module):
    def __init__(self, in_channels: int, *, rates: tuple[int, ...], norm: NormSpec, channels: int = 256):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_norm_relu(in_channels, channels, 1, norm=norm)]
            + [conv_norm_relu(in_channels, channels, 3, norm=norm, dilation=r) for r in rates]
        )
        # Image pooling works on a 1x1 map: a BN there sees one value per channel at batch 1 per GPU, as the
        # study runs ("Expected more than 1 value per channel when training"). So this branch is a biased conv
        # without a norm, for every norm spec, so that the head's architecture does not vary with the norm.
        # Under `+ws` it stays a plain conv, as the classifier: WS fixes a conv's output scale, which only a
        # norm after it makes learnable again (the WS paper standardizes the convs before BN/GN).
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv(in_channels, channels, 1, bias=True), nn.ReLU(inplace=True)
        )
        self.project = conv_norm_relu(channels * (len(rates) + 2), channels, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """Features {"low", "out"} -> logits [B, num_classes, H/4, W/4].

    With `+ws`, every conv followed by a norm is weight-standardized; the classifier and the image-pooling
    conv (no norm after them) are plain convs.
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
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"unknown output_stride {output_stride!r}; allowed: {', '.join(map(str, OUTPUT_STRIDES))}"
            )
        rates = tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)
        norm = parse_norm(norm)
        self.aspp = ASPP(in_channels, rates=rates, norm=norm)
        self.low_project = conv_norm_relu(low_channels, 48, 1, norm=norm)
        self.fuse = nn.Sequential(
            conv_norm_relu(256 + 48, 256, 3, norm=norm), conv_norm_relu(256, 256, 3, norm=norm)
        )
        self.classifier = conv(256, num_classes, 1, bias=True)
        init_conv_weights(self)
        # Kaiming fan-out on a 3-output 1x1 conv gives logits with std ~9 at init (a first loss ~6);
        # small weights start the classifier near uniform, where cross-entropy is ln(3).
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        low = self.low_project(features["low"])
        context = F.interpolate(
            self.aspp(features["out"]), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.classifier(self.fuse(torch.cat([context, low], dim=1)))
