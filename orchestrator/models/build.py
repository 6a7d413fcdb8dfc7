"""`build_model`: backbone + head from plain values (the trial config), optionally with pretrained weights.

A backbone's code is found from its catalog record (`catalog.BACKBONES`): the function named like the backbone
in orchestrator.models.<record.module>. It gives `forward(x) -> {"low": stride-4 features, "out": final
features}` with the record's channels. A backbone with its own head (ENet) is a whole model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

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
from orchestrator.models.fcn import FCNHead
from orchestrator.models.pretrained import load_pretrained

# name -> class, called as f(low_channels, in_channels, num_classes, norm=NormSpec, output_stride=int).
HEAD_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3plus": DeepLabV3PlusHead,
    "deeplabv3": DeepLabV3Head,
    "fcn": FCNHead,
}


def backbone_constructor(name: str) -> Callable[..., nn.Module]:
    """The function that builds the backbone `name` (see catalog.Backbone)."""
    return getattr(importlib.import_module(f"orchestrator.models.{BACKBONES[name].module}"), name)


class SegmentationModel(nn.Module):
    """Images [B, 3, H, W] -> logits [B, num_classes, H, W]. `.backbone` and `.head` get separate LRs.
    `.pretrained_left_out`: the backbone's tensors its pretrained file left as initialized (see
    `load_pretrained`), for the trial's record."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pretrained_left_out: Sequence[str] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pretrained_left_out = list(pretrained_left_out)

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
    pretrained_strict: bool = True,
    storage_options: dict | None = None,
    multi_grid: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build a segmentation model with `.backbone` and `.head`. `head` and `output_stride` default to the
    backbone's own (catalog.default_head / catalog.output_strides). `pretrained` is a URI of a backbone
    state_dict in the backbone's key layout (torchvision's for ResNets, timm's for ResNet-D and Xception,
    fyu/drn's for DRN, mapillary's for WiderResNet38); `pretrained_strict`: refuse one that would leave some
    of the backbone as initialized (`load_pretrained`). `multi_grid`: unit rates of the last stage's blocks
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
    record, build = BACKBONES[backbone], backbone_constructor(backbone)
    if record.own_head:
        if pretrained:
            raise ValueError(
                f"backbone {backbone!r} takes no pretrained weights (it is trained from scratch)"
            )
        return build(num_classes, norm=norm_spec)
    options = {} if multi_grid is None else {"multi_grid": multi_grid}
    net = build(norm=norm_spec, output_stride=output_stride, **options)
    left_out = (
        load_pretrained(net, pretrained, storage_options, strict=pretrained_strict) if pretrained else []
    )
    low, out = record.channels
    head_net = HEAD_BUILDERS[head](low, out, num_classes, norm=norm_spec, output_stride=output_stride)
    return SegmentationModel(net, head_net, left_out)
