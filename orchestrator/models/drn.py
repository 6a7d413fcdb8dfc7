"""DRN-D-22 and DRN-D-105 (Yu, Koltun, Funkhouser, "Dilated Residual Networks", CVPR 2017) with the
parameter names of fyu/drn, so its state_dicts load by name; no global pooling or fc.

The D variants: a conv stem (levels 1-2: plain convs, no max-pool), ResNet levels 3-6 with dilation 2 and 4
instead of stride in levels 5 and 6, and the degridding levels 7-8: plain convs without residual connections.
The output stride is 8 by design.
"""

from __future__ import annotations

from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec, parse_norm
from orchestrator.models.layers import conv_norm_act, dilation_plan, init_conv_weights
from orchestrator.models.resnet import BasicBlock, Bottleneck

CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)  # per level 1-8 (a residual level's planes)
# (stride, dilation) of levels 3-6, the residual ones: ResNet's strides of 2 at output stride 8, after the
# stem's 2, every block of a level dilated alike: ((2, 1), (2, 1), (1, 2), (1, 4)).
_RESIDUAL_LEVELS = [(stride, dilation) for stride, _, dilation in dilation_plan((2, 2, 2, 2), 2, 8)]

# name -> (block, blocks or convs per level 1-8)
_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    "drn_d_22": (BasicBlock, (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_d_105": (Bottleneck, (1, 1, 3, 4, 23, 3, 1, 1)),
}
OUTPUT_STRIDE = 8


def _conv_level(
    in_channels: int,
    out_channels: int,
    convs: int,
    *,
    norm: NormSpec,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
) -> nn.Sequential:
    """`convs` x (conv, norm, ReLU), the first strided; flat, as fyu/drn's keys (`layer7.0.weight`)."""
    return nn.Sequential(
        *(
            module
            for i in range(convs)
            for module in conv_norm_act(
                in_channels if i == 0 else out_channels,
                out_channels,
                kernel_size,
                norm=norm,
                stride=stride if i == 0 else 1,
                dilation=dilation,
            )
        )
    )


class DRN(nn.Module):
    """Features {"low": layer3 (stride 4), "out": layer8 (stride 8, 512 ch)}.

    layer0 is the 7x7 stem conv (stride 1) and layer1-8 the paper's levels 1-8. Residual levels 3-6 use
    ResNet's blocks (the same key names as fyu/drn's); as there, a dilated level's first block is dilated
    too. With `ibn-a` / `ign-a:*` the first norm of every block in levels 3-5 (the widths of ResNet's
    layer1-3) is an IBN layer.
    """

    def __init__(self, name: str, *, norm: str | NormSpec = "bn", output_stride: int = OUTPUT_STRIDE) -> None:
        super().__init__()
        if name not in _ARCHS:
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(_ARCHS)}")
        if output_stride != OUTPUT_STRIDE:
            raise ValueError(
                f"{name} has output stride {OUTPUT_STRIDE} by design (dilated levels 5-8); "
                f"got output_stride {output_stride!r}"
            )
        block, depths = _ARCHS[name]
        norm = parse_norm(norm)
        self.layer0 = _conv_level(3, CHANNELS[0], 1, kernel_size=7, norm=norm)
        self.layer1 = _conv_level(CHANNELS[0], CHANNELS[0], depths[0], norm=norm)
        self.layer2 = _conv_level(CHANNELS[0], CHANNELS[1], depths[1], stride=2, norm=norm)

        in_channels, levels = CHANNELS[1], []
        for level, (planes, depth, (stride, dilation)) in enumerate(
            zip(CHANNELS[2:6], depths[2:6], _RESIDUAL_LEVELS, strict=True), start=3
        ):
            blocks = []
            for i in range(depth):
                blocks.append(
                    block(
                        in_channels,
                        planes,
                        stride=stride if i == 0 else 1,
                        first_dilation=dilation,
                        dilation=dilation,
                        norm=norm,
                        instance_half=level <= 5,
                        avg_down=False,
                    )
                )
                in_channels = planes * block.expansion
            levels.append(nn.Sequential(*blocks))
        self.layer3, self.layer4, self.layer5, self.layer6 = levels
        self.layer7 = _conv_level(in_channels, CHANNELS[6], depths[6], dilation=2, norm=norm)
        self.layer8 = _conv_level(CHANNELS[6], CHANNELS[7], depths[7], norm=norm)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low = self.layer3(self.layer2(self.layer1(self.layer0(x))))
        out = self.layer8(self.layer7(self.layer6(self.layer5(self.layer4(low)))))
        return {"low": low, "out": out}


# The backbones the catalog names (catalog.BACKBONES: module "drn"), one function each.
def drn_d_22(**kwargs) -> DRN:
    return DRN("drn_d_22", **kwargs)


def drn_d_105(**kwargs) -> DRN:
    return DRN("drn_d_105", **kwargs)
