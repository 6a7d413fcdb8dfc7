"""ResNet-18/50 backbones with torchvision's parameter names, so ImageNet state_dicts load by name.

Output stride 16 or 8 replaces the stride of the last stage(s) by dilation (DeepLab); no avgpool/fc.
"""

from __future__ import annotations

from torch import Tensor, nn

from orchestrator.models.catalog import BACKBONES, OUTPUT_STRIDES, NormSpec, parse_norm
from orchestrator.models.layers import conv, init_conv_weights
from orchestrator.models.norms import make_norm


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int,
        first_dilation: int,
        dilation: int,
        norm: NormSpec,
        instance_half: bool,
    ) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, planes, 3, stride=stride, dilation=first_dilation, ws=norm.ws)
        self.bn1 = make_norm(norm, planes, instance_half=instance_half)
        self.conv2 = conv(planes, planes, 3, dilation=dilation, ws=norm.ws)
        self.bn2 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int,
        first_dilation: int,
        dilation: int,
        norm: NormSpec,
        instance_half: bool,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, ws=norm.ws)
        self.bn1 = make_norm(norm, planes, instance_half=instance_half)
        self.conv2 = conv(planes, planes, 3, stride=stride, dilation=first_dilation, ws=norm.ws)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = conv(planes, out_channels, 1, ws=norm.ws)
        self.bn3 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: NormSpec) -> nn.Sequential | None:
    """Projection shortcut (torchvision's `downsample.0` conv, `downsample.1` norm) when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        conv(in_channels, out_channels, 1, stride=stride, ws=norm.ws), make_norm(norm, out_channels)
    )


# name -> (block, blocks per stage)
_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def _stage_plan(output_stride: int) -> list[tuple[int, int, int]]:
    """(stride, first block's dilation, other blocks' dilation) per stage.

    A stage that would push the stride past output_stride dilates instead; as torchvision, its first block
    keeps the previous dilation. OS16: layer4 dilation 2; OS8: layer3 dilation 2, layer4 dilation 4.
    """
    plan, reduction, dilation = [], 4, 1  # the stem reduces by 4
    for stride in (1, 2, 2, 2):
        first_dilation = dilation
        if reduction * stride > output_stride:
            dilation, stride = dilation * stride, 1
        reduction *= stride
        plan.append((stride, first_dilation, dilation))
    return plan


class ResNet(nn.Module):
    """Features {"low": layer1 (stride 4), "out": layer4 (stride `output_stride`)}.

    With `+ws` every conv is weight-standardized, the stem's too (all of them feed a norm). With `ibn-a` /
    `ign-a:*` the first norm of every block in layer1-3 is an IBN layer, as IBN-Net-a; the stem, layer4
    and the rest keep the plain norm.
    """

    def __init__(self, name: str, *, norm: str | NormSpec = "bn", output_stride: int = 16) -> None:
        super().__init__()
        if name not in _ARCHS:
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"unknown output_stride {output_stride!r}; allowed: {', '.join(map(str, OUTPUT_STRIDES))}"
            )
        block, depths = _ARCHS[name]
        norm = parse_norm(norm)
        self.conv1 = conv(3, 64, 7, stride=2, ws=norm.ws)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels, stages = 64, []
        for stage, (planes, depth, (stride, first_dilation, dilation)) in enumerate(
            zip((64, 128, 256, 512), depths, _stage_plan(output_stride), strict=True)
        ):
            blocks = []
            for i in range(depth):
                blocks.append(
                    block(
                        in_channels,
                        planes,
                        stride=stride if i == 0 else 1,
                        first_dilation=first_dilation if i == 0 else dilation,
                        dilation=dilation,
                        norm=norm,
                        instance_half=stage < 3,  # IBN-Net-a: layer1-3
                    )
                )
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.low_channels = 64 * block.expansion
        self.out_channels = 512 * block.expansion

        init_conv_weights(self)
        # Zero gamma in each block's last norm: every residual block starts as identity (Goyal et al.; the
        # GroupNorm paper trains its ResNets this way). Pretrained weights overwrite it. Not for a frozen
        # norm's weight (a buffer): zero there would cut the residual branch for good.
        for m in self.modules():
            if isinstance(m, BasicBlock | Bottleneck) and isinstance(m.last_norm().weight, nn.Parameter):
                nn.init.zeros_(m.last_norm().weight)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        out = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "out": out}
