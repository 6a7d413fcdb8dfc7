"""`build_model`: backbone + head from plain values (the trial config), optionally with pretrained weights.

Adding a backbone: one line in BACKBONE_BUILDERS (its constructor) and its name in `catalog.BACKBONES` (the
torch-free list the spec validates against, with its output strides and default head). A backbone gives
`forward(x) -> {"low": stride-4 features, "out": final features}` and the attributes `low_channels`,
`out_channels`. A model whose head is part of its architecture (ENet) goes into WHOLE_MODELS and
`catalog.OWN_HEADS`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import (
    BACKBONES,
    HEADS,
    check_model,
    default_head,
    output_strides,
    parse_norm,
)
from orchestrator.models.deeplab import DeepLabV3Head, DeepLabV3PlusHead
from orchestrator.models.drn import DRN
from orchestrator.models.enet import ENet
from orchestrator.models.fcn import FCNHead
from orchestrator.models.pretrained import load_pretrained
from orchestrator.models.resnet import ResNet
from orchestrator.models.wider_resnet import WiderResNet38
from orchestrator.models.xception import Xception65

# name -> constructor, called as f(norm=NormSpec, output_stride=int), with multi_grid=... only when given.
BACKBONE_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": partial(ResNet, "resnet18"),
    "resnet50": partial(ResNet, "resnet50"),
    "resnet101": partial(ResNet, "resnet101"),
    "resnet152": partial(ResNet, "resnet152"),
    "resnet50d": partial(ResNet, "resnet50", deep_stem=True, avg_down=True),
    "resnet101d": partial(ResNet, "resnet101", deep_stem=True, avg_down=True),
    "xception65": Xception65,
    "drn_d_22": partial(DRN, "drn_d_22"),
    "drn_d_105": partial(DRN, "drn_d_105"),
    "wider_resnet38": WiderResNet38,
}

# Whole models whose head is part of the architecture (catalog.OWN_HEADS), called as f(num_classes, norm=...).
# They expose `.backbone` and `.head` like SegmentationModel and return logits at input size.
WHOLE_MODELS: dict[str, Callable[..., nn.Module]] = {"enet": ENet}

# name -> class, called as f(low_channels, in_channels, num_classes, norm=NormSpec, output_stride=int).
HEAD_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3plus": DeepLabV3PlusHead,
    "deeplabv3": DeepLabV3Head,
    "fcn": FCNHead,
}


class SegmentationModel(nn.Module):
    """Images [B, 3, H, W] -> logits [B, num_classes, H, W]. `.backbone` and `.head` get separate LRs."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_model(
    backbone: str,
    head: str | None = None,
    *,
    num_classes: int = 3,
    norm: str = "bn",
    output_stride: int | None = None,
    pretrained: str | None = None,
    storage_options: dict | None = None,
    multi_grid: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build a segmentation model with `.backbone` and `.head`. `head` and `output_stride` default to the
    backbone's own (catalog.default_head / catalog.output_strides). `pretrained` is a URI of a backbone
    state_dict in the backbone's key layout (torchvision's for ResNets, timm's for ResNet-D and Xception,
    fyu/drn's for DRN, mapillary's for WiderResNet38). `multi_grid`: unit rates of the last stage's blocks
    (DeepLabv3), for the backbones that take it (the ResNets)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    head = head or default_head(backbone)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    output_stride = output_stride or output_strides(backbone)[0]
    norm_spec = parse_norm(norm)
    check_model(backbone, head, output_stride, norm_spec)
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if backbone in WHOLE_MODELS:
        if pretrained:
            raise ValueError(
                f"backbone {backbone!r} takes no pretrained weights (it is trained from scratch)"
            )
        return WHOLE_MODELS[backbone](num_classes, norm=norm_spec)
    options = {} if multi_grid is None else {"multi_grid": multi_grid}
    net = BACKBONE_BUILDERS[backbone](norm=norm_spec, output_stride=output_stride, **options)
    if pretrained:
        load_pretrained(net, pretrained, storage_options)
    return SegmentationModel(
        net,
        HEAD_BUILDERS[head](
            net.low_channels, net.out_channels, num_classes, norm=norm_spec, output_stride=output_stride
        ),
    )
