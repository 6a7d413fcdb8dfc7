"""Aligned Xception-65 (DeepLabv3+, Chen et al., ECCV 2018) with timm's `xception65` parameter names, so its
ImageNet state_dict (a port of DeepLab's TF checkpoint) loads by name; no classifier head.

As DeepLab's TF model (which timm follows): every max-pool is a strided separable conv, every depthwise conv
is followed by a norm, and output stride 8 or 16 replaces the last strides by dilation. The paper's "extra
BN and ReLU after each depthwise conv" is, in that code, a ReLU before each separable conv and none between
its depthwise and pointwise convs, except in the last block (see SeparableConv2d); we follow the code, which
the checkpoints were trained with. They used BatchNorm eps 1e-3; make_norm's layers use 1e-5.
"""

from __future__ import annotations

from torch import Tensor, nn

from orchestrator.models.catalog import NORMS, NormSpec, check_output_stride, parse_norm
from orchestrator.models.layers import conv, dilation_plan, init_conv_weights
from orchestrator.models.norms import make_act, make_norm


class ConvNorm(nn.Module):
    """conv -> norm [-> ReLU], named as timm's ConvNormAct (`conv`, `bn`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int,
        norm: NormSpec,
        relu: bool,
    ) -> None:
        super().__init__()
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, norm=norm)
        self.bn = make_norm(norm, out_channels)
        self.act = make_act(norm, out_channels) if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 -> norm -> pointwise 1x1 -> norm, the only conv of the blocks.

    `relu_first` (DeepLab's design for all but the last block): one ReLU before the depthwise conv and none
    inside. Otherwise a ReLU after each norm (DeepLab's `activation_fn_in_separable_conv`, the last block).
    Under `+ws` the pointwise conv is weight-standardized, the depthwise one not (layers.conv says why).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        dilation: int,
        norm: NormSpec,
        relu_first: bool,
    ) -> None:
        super().__init__()
        # Not in place: its input is the block's shortcut, or the decoder's low-level feature.
        self.pre_act = make_act(norm, in_channels, inplace=False) if relu_first else nn.Identity()
        self.conv_dw = conv(
            in_channels, in_channels, 3, stride=stride, dilation=dilation, groups=in_channels, norm=norm
        )
        self.bn_dw = make_norm(norm, in_channels)
        self.act_dw = nn.Identity() if relu_first else make_act(norm, in_channels)
        self.conv_pw = conv(in_channels, out_channels, 1, norm=norm)
        self.bn_pw = make_norm(norm, out_channels)
        self.act_pw = nn.Identity() if relu_first else make_act(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_dw(self.bn_dw(self.conv_dw(self.pre_act(x))))
        return self.act_pw(self.bn_pw(self.conv_pw(x)))


class XceptionModule(nn.Module):
    """Three separable convs (`stack.conv1..3`, the stride on the third) plus a shortcut: identity, a
    strided 1x1 conv + norm where the shape changes, or none (the last block, DeepLab's skip type 'none')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: tuple[int, int, int],
        *,
        stride: int,
        dilation: int,
        norm: NormSpec,
        last: bool = False,
    ) -> None:
        super().__init__()
        self.skip = not last
        self.shortcut = (
            ConvNorm(in_channels, out_channels[-1], 1, stride=stride, norm=norm, relu=False)
            if self.skip and (stride != 1 or in_channels != out_channels[-1])
            else None
        )
        channels = (in_channels, *out_channels)
        self.stack = nn.Sequential()
        for i in range(3):
            self.stack.add_module(
                f"conv{i + 1}",
                SeparableConv2d(
                    channels[i],
                    channels[i + 1],
                    stride=stride if i == 2 else 1,
                    dilation=dilation,
                    norm=norm,
                    relu_first=not last,
                ),
            )

    def forward_with_inner(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The block's output, and its second separable conv's output (before the third's ReLU)."""
        inner = self.stack[:2](x)
        out = self.stack[2](inner)
        if self.skip:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out, inner

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_inner(x)[0]


# (input channels, output channels of the three separable convs, stride): entry flow, middle flow, exit flow.
_BLOCKS: list[tuple[int, tuple[int, int, int], int]] = [
    (64, (128, 128, 128), 2),
    (128, (256, 256, 256), 2),
    (256, (728, 728, 728), 2),
    *[(728, (728, 728, 728), 1)] * 16,
    (728, (728, 1024, 1024), 2),
    (1024, (1536, 1536, 2048), 1),
]
_LOW_BLOCK = 1  # entry block 2, whose inner features sit at stride 4


class Xception65(nn.Module):
    """Features {"low": stride 4, 256 ch, "out": stride `output_stride`, 2048 ch}.

    "low" is entry-flow block 2's second separable conv output (its pointwise norm, before the ReLU of the
    third): DeepLab's decoder end point `entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise`
    (timm's stride-4 feature is the same tensor after that ReLU).

    Output stride: the block whose stride would pass it keeps stride 1 and the current dilation; the blocks
    after it dilate by the dropped stride (DeepLab's stack_blocks_dense). OS16: exit block 1 undilated,
    exit block 2 dilation 2; OS8: entry block 3 undilated, middle flow and exit block 1 dilation 2, exit
    block 2 dilation 4. IBN-a specs are refused: IBN-Net defines where instance norm goes in ResNets only.
    """

    def __init__(self, *, norm: str | NormSpec = "bn", output_stride: int = 16) -> None:
        super().__init__()
        check_output_stride(output_stride)
        norm = parse_norm(norm)
        if NORMS[norm.kind].mixes_instance:
            raise ValueError(f"norm {str(norm)!r} places instance norm in ResNet stages; xception65 has none")
        self.stem = nn.Sequential(
            ConvNorm(3, 32, 3, stride=2, norm=norm, relu=True),
            ConvNorm(32, 64, 3, stride=1, norm=norm, relu=True),
        )
        self.blocks = nn.Sequential()
        plan = dilation_plan([stride for _, _, stride in _BLOCKS], 2, output_stride)  # the stem reduces by 2
        blocks = zip(_BLOCKS, plan, strict=True)
        for i, ((in_channels, out_channels, _), (stride, block_dilation, _)) in enumerate(blocks):
            self.blocks.add_module(
                str(i),
                XceptionModule(
                    in_channels,
                    out_channels,
                    stride=stride,
                    dilation=block_dilation,
                    norm=norm,
                    last=i == len(_BLOCKS) - 1,
                ),
            )
        init_conv_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.blocks[:_LOW_BLOCK](self.stem(x))
        x, low = self.blocks[_LOW_BLOCK].forward_with_inner(x)
        return {"low": low, "out": self.blocks[_LOW_BLOCK + 1 :](x)}


def xception65(**kwargs) -> Xception65:
    """The backbone the catalog names `xception65`."""
    return Xception65(**kwargs)
