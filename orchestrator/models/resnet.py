"""ResNet-18/50/101/152 backbones with torchvision's parameter names, so ImageNet state_dicts load by name;
optionally ResNet-D's deep stem and average-pool shortcuts, named as timm's `resnet*d`.

Output stride 16 or 8 replaces the stride of the last stage(s) by dilation (DeepLab), optionally with
DeepLabv3's multi-grid in layer4; no avgpool/fc.
"""

from __future__ import annotations

from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec, check_output_stride, parse_norm
from orchestrator.models.layers import conv, conv_norm_act, dilation_plan, init_conv_weights
from orchestrator.models.norms import make_act, make_norm, norm_act


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
        avg_down: bool,
    ) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, planes, 3, stride=stride, dilation=first_dilation, norm=norm)
        self.bn1, self.act1 = norm_act(norm, planes, instance_half=instance_half)
        self.conv2 = conv(planes, planes, 3, dilation=dilation, norm=norm)
        self.bn2 = make_norm(norm, planes)
        self.act2 = make_act(norm, planes)  # after the sum
        self.downsample = _shortcut(in_channels, planes, stride, norm, avg_down=avg_down)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act2(out + identity)


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
        avg_down: bool,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, norm=norm)
        self.bn1, self.act1 = norm_act(norm, planes, instance_half=instance_half)
        self.conv2 = conv(planes, planes, 3, stride=stride, dilation=first_dilation, norm=norm)
        self.bn2, self.act2 = norm_act(norm, planes)
        self.conv3 = conv(planes, out_channels, 1, norm=norm)
        self.bn3 = make_norm(norm, out_channels)
        self.act3 = make_act(norm, out_channels)  # after the sum
        self.downsample = _shortcut(in_channels, out_channels, stride, norm, avg_down=avg_down)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


def _shortcut(
    in_channels: int, out_channels: int, stride: int, norm: NormSpec, *, avg_down: bool
) -> nn.Sequential | None:
    """Projection shortcut when the shape changes: torchvision's strided 1x1 conv `downsample.0` + norm
    `downsample.1`; with `avg_down` (ResNet-D), timm's layout: `downsample.0` a 2x2 average pool that strides
    (so the 1x1 conv sees every input, not one in four), `.1` the conv, `.2` the norm.

    Where a dilated stage replaced the stride (stride 1), `downsample.0` is an Identity; timm pools 2x2 at
    stride 1 there. Neither has parameters, so the weights map either way.
    """
    if stride == 1 and in_channels == out_channels:
        return None
    if not avg_down:
        return nn.Sequential(
            conv(in_channels, out_channels, 1, stride=stride, norm=norm), make_norm(norm, out_channels)
        )
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, conv(in_channels, out_channels, 1, norm=norm), make_norm(norm, out_channels))


def _deep_stem(norm: NormSpec) -> nn.Sequential:
    """ResNet-D's stem (He et al., "Bag of Tricks", CVPR 2019): three 3x3 convs 32-32-64, the first strided,
    instead of one 7x7. Laid out as timm's `resnet*d` so its weights load by name: convs `conv1.0`,
    `conv1.3`, `conv1.6`, norms `conv1.1`, `conv1.4`; the last conv's norm is the model's `bn1`."""
    return nn.Sequential(
        *conv_norm_act(3, 32, 3, norm=norm, stride=2),
        *conv_norm_act(32, 32, 3, norm=norm),
        conv(32, 64, 3, norm=norm),
    )


# name -> (block, blocks per stage), as torchvision
_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _stage_plan(output_stride: int) -> list[tuple[int, int, int]]:
    """(stride, first block's dilation, other blocks' dilation) per stage (layers.dilation_plan); as
    torchvision, a dilated stage's first block keeps the previous dilation. OS16: layer4 dilation 2; OS8:
    layer3 dilation 2, layer4 dilation 4."""
    return dilation_plan((1, 2, 2, 2), 4, output_stride)  # after the stem's reduction by 4


class ResNet(nn.Module):
    """Features {"low": layer1 (stride 4), "out": layer4 (stride `output_stride`)}.

    With `+ws` every conv is weight-standardized, the stem's too (all of them feed a norm). With `ibn-a` /
    `ign-a:*` the first norm of every block in layer1-3 is an IBN layer, as IBN-Net-a; the stem, layer4
    and the rest keep the plain norm.

    `multi_grid` (DeepLabv3, Sec. 3.2): one unit rate per block of layer4, e.g. (1, 2, 4); block i's 3x3
    convs dilate by layer4's rate x unit i (OS16: 2 x (1, 2, 4) = (2, 4, 8)), its first block too. None:
    torchvision's plan, where layer4's first block keeps the previous stage's dilation.
    `deep_stem` and `avg_down` together make ResNet-D (timm's `resnet*d`, see `_deep_stem`, `_shortcut`).
    """

    def __init__(
        self,
        name: str,
        *,
        norm: str | NormSpec = "bn",
        output_stride: int = 16,
        multi_grid: tuple[int, ...] | None = None,
        deep_stem: bool = False,
        avg_down: bool = False,
    ) -> None:
        super().__init__()
        if name not in _ARCHS:
            raise ValueError(f"unknown ResNet {name!r}; allowed: {', '.join(_ARCHS)}")
        check_output_stride(output_stride)
        block, depths = _ARCHS[name]
        if multi_grid is not None and (len(multi_grid) != depths[3] or min(multi_grid) < 1):
            raise ValueError(
                f"multi_grid needs one positive unit rate per block of layer4 ({depths[3]} for {name}), "
                f"got {multi_grid!r}"
            )
        norm = parse_norm(norm)
        self.conv1 = _deep_stem(norm) if deep_stem else conv(3, 64, 7, stride=2, norm=norm)
        self.bn1, self.act1 = norm_act(norm, 64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels, stages = 64, []
        for stage, (planes, depth, (stride, first_dilation, dilation)) in enumerate(
            zip((64, 128, 256, 512), depths, _stage_plan(output_stride), strict=True)
        ):
            # per block: (dilation of the conv that may stride, of its other 3x3 convs)
            rates = [(first_dilation, dilation)] + [(dilation, dilation)] * (depth - 1)
            if stage == 3 and multi_grid is not None:
                rates = [(dilation * unit, dilation * unit) for unit in multi_grid]
            blocks = []
            for i, (block_first_dilation, block_dilation) in enumerate(rates):
                blocks.append(
                    block(
                        in_channels,
                        planes,
                        stride=stride if i == 0 else 1,
                        first_dilation=block_first_dilation,
                        dilation=block_dilation,
                        norm=norm,
                        instance_half=stage < 3,  # IBN-Net-a: layer1-3
                        avg_down=avg_down,
                    )
                )
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        init_conv_weights(self)
        # Zero gamma in each block's last norm: every residual block starts as identity (Goyal et al.; the
        # GroupNorm paper trains its ResNets this way). Pretrained weights overwrite it. Not for a frozen
        # norm's weight (a buffer): zero there would cut the residual branch for good.
        for m in self.modules():
            if isinstance(m, BasicBlock | Bottleneck) and isinstance(m.last_norm().weight, nn.Parameter):
                nn.init.zeros_(m.last_norm().weight)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        out = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "out": out}


# The backbones the catalog names (catalog.BACKBONES: module "resnet"), one function each.
def resnet18(**kwargs) -> ResNet:
    return ResNet("resnet18", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    return ResNet("resnet101", **kwargs)


def resnet152(**kwargs) -> ResNet:
    return ResNet("resnet152", **kwargs)


def resnet50d(**kwargs) -> ResNet:
    return ResNet("resnet50", deep_stem=True, avg_down=True, **kwargs)


def resnet101d(**kwargs) -> ResNet:
    return ResNet("resnet101", deep_stem=True, avg_down=True, **kwargs)
