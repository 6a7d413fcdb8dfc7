"""The FCN head of Dilated Residual Networks (Yu et al., CVPR 2017): a 1x1 classifier on the final features,
upsampled bilinearly to the input size by the model (`build.SegmentationModel`). No context module, no
decoder: the backbone's dilations give the context. Works on any backbone's "out" features."""

from __future__ import annotations

from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec
from orchestrator.models.layers import classifier


class FCNHead(nn.Module):
    """Features {"out"} -> logits [B, num_classes, H/output_stride, W/output_stride].

    Takes the arguments every head takes (so that `build_model` builds any head alike); a lone classifier
    needs neither the low-level features, nor a norm, nor the output stride.
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
        self.classifier = classifier(in_channels, num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])
