"""WiderResNet38-A2 (Wu, Shen & van den Hengel, "Wider or Deeper", 2019), the backbone of the report's
WiderResNet38 + ASPP rows, as mapillary/inplace_abn's `wider_resnet38_a2` (the dilated segmentation variant).

Pre-activation (identity-mapping) residual blocks: each block normalizes and activates its input, then convs;
the sum is not activated, and one final norm-act (`bn_out`) closes the network. Parameter names follow the
reference (`mod2.block1.convs.conv1.weight`, `...proj_conv.weight`, `bn_out.running_mean`), so its ImageNet
checkpoints load by name; no classifier.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec, check_output_stride, parse_norm
from orchestrator.models.layers import conv, dilation_plan, init_conv_weights
from orchestrator.models.norms import norm_act

# The reference's norm-act is in-place ABN with leaky ReLU 0.01 (its WiderResNet38 ImageNet config).
ACT = "leaky_relu"

# mod2..mod7: blocks, conv widths (two: two 3x3 convs; three: a 1x1-3x3-1x1 bottleneck), and the reference's
# spatial dropout before the last conv of each block (mod6, mod7; off in eval).
_STAGES: tuple[tuple[int, tuple[int, ...], float], ...] = (
    (3, (128, 128), 0.0),
    (3, (256, 256), 0.0),
    (6, (512, 512), 0.0),
    (3, (512, 1024), 0.0),
    (1, (512, 1024, 2048), 0.3),
    (1, (1024, 2048, 4096), 0.5),
)


class PreActBlock(nn.Module):
    """x + convs(act(norm(x))), or proj_conv(act(norm(x))) + convs(...) when the shape changes.

    The stride sits on the first conv, the dilation on the 3x3 convs.
    """

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        *,
        stride: int,
        dilation: int,
        dropout: float,
        norm: NormSpec,
    ) -> None:
        super().__init__()
        self.bn1, self.act1 = norm_act(norm, in_channels, ACT)
        kernels = (3, 3) if len(widths) == 2 else (1, 3, 1)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i, (kernel, width) in enumerate(zip(kernels, widths, strict=True), start=1):
            if i > 1:  # the reference's names: conv<i> after bn<i>; bn1 is the block's input norm
                layers[f"bn{i}"], layers[f"act{i}"] = norm_act(norm, channels, ACT)
            if i == len(kernels) and dropout:
                layers["dropout"] = nn.Dropout2d(dropout)
            layers[f"conv{i}"] = conv(
                channels,
                width,
                kernel,
                stride=stride if i == 1 else 1,
                dilation=dilation if kernel == 3 else 1,
                norm=norm,
            )
            channels = width
        self.convs = nn.Sequential(layers)
        self.proj_conv = (
            conv(in_channels, channels, 1, stride=stride, norm=norm)
            if stride != 1 or in_channels != channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.proj_conv is None else self.proj_conv(pre)
        return self.convs(pre) + shortcut


def _stage_plan(output_stride: int) -> list[tuple[int, int]]:
    """(first block's stride, every block's dilation) for mod4..mod7, which start at stride 4.

    The reference strides mod4-mod6 (output stride 32); a stride that would pass `output_stride` becomes
    dilation for the whole stage, as the reference's A2 does at output stride 8 (mod5 dilation 2, mod6-mod7
    4). At 16: mod5 strides, mod6-mod7 dilation 2.
    """
    return [(stride, dilation) for stride, _, dilation in dilation_plan((2, 2, 2, 1), 4, output_stride)]


class WiderResNet38(nn.Module):
    """Features {"low": mod3 (stride 4, 256 ch.), "out": norm-act of mod7 (stride `output_stride`, 4096 ch.)}.

    "low" is the residual stream (pre-activation blocks leave it unnormalized); the head's projection
    normalizes it. With `+ws` every conv is weight-standardized: each feeds a norm, directly or through the
    residual sum into the next block's input norm.
    """

    def __init__(self, *, norm: str | NormSpec = "bn", output_stride: int = 16) -> None:
        super().__init__()
        check_output_stride(output_stride)
        norm = parse_norm(norm)
        self.mod1 = nn.Sequential(OrderedDict(conv1=conv(3, 64, 3, norm=norm)))
        # mod2 and mod3 downsample by max-pooling before them; mod4.. by their first block's stride.
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        plan = [(1, 1), (1, 1), *_stage_plan(output_stride)]
        in_channels, stages = 64, []
        for (depth, widths, dropout), (stride, dilation) in zip(_STAGES, plan, strict=True):
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(depth):
                blocks[f"block{i + 1}"] = PreActBlock(
                    in_channels,
                    widths,
                    stride=stride if i == 0 else 1,
                    dilation=dilation,
                    dropout=dropout,
                    norm=norm,
                )
                in_channels = widths[-1]
            stages.append(nn.Sequential(blocks))
        self.mod2, self.mod3, self.mod4, self.mod5, self.mod6, self.mod7 = stages
        self.bn_out, self.act_out = norm_act(norm, in_channels, ACT)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low = self.mod3(self.pool3(self.mod2(self.pool2(self.mod1(x)))))
        out = self.mod7(self.mod6(self.mod5(self.mod4(low))))
        return {"low": low, "out": self.act_out(self.bn_out(out))}


def wider_resnet38(**kwargs) -> WiderResNet38:
    """The backbone the catalog names `wider_resnet38`."""
    return WiderResNet38(**kwargs)
