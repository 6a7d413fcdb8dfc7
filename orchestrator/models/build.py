"""`build_model`: backbone + head from plain values (the trial config), optionally with pretrained weights."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import HEADS, parse_norm
from orchestrator.models.deeplab import DeepLabV3PlusHead
from orchestrator.models.pretrained import load_pretrained
from orchestrator.models.resnet import ResNet


class SegmentationModel(nn.Module):
    """Images [B, 3, H, W] -> logits [B, num_classes, H, W]. `.backbone` and `.head` get separate LRs."""

    def __init__(self, backbone: ResNet, head: DeepLabV3PlusHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(
    backbone: str,
    head: str = "deeplabv3plus",
    *,
    num_classes: int = 3,
    norm: str = "bn",
    output_stride: int = 16,
    pretrained: str | None = None,
    storage_options: dict | None = None,
) -> SegmentationModel:
    """Build a segmentation model; `pretrained` is a URI of a torchvision-layout backbone state_dict."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    norm_spec = parse_norm(norm)
    net = ResNet(backbone, norm=norm_spec, output_stride=output_stride)
    if pretrained:
        load_pretrained(net, pretrained, storage_options)
    return SegmentationModel(
        net,
        DeepLabV3PlusHead(
            net.low_channels, net.out_channels, num_classes, norm=norm_spec, output_stride=output_stride
        ),
    )
