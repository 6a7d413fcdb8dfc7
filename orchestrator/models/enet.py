"""ENet (Paszke et al., 2016): a small encoder-decoder that segments at input resolution.

Layout as the paper's Table 1 and the authors' Torch code (e-lab/ENet-training): an initial block, encoder
stages 1-3 (`.backbone`) and decoder stages 4-5 + fullconv (`.head`). Bottlenecks are 1x1 projection to a
quarter of the output channels, a regular / dilated / asymmetric (5x1 then 1x5) conv, 1x1 expansion, spatial
dropout, a residual sum and PReLU; the paper places a norm and PReLU between all convs. Downsampling
bottlenecks max-pool the shortcut (zero-padding its channels); the decoder max-unpools with the encoder's
indices, which the encoder returns in its features dict.

Departures from the authors' code, all small in parameters: a norm + PReLU also between the asymmetric 5x1
and 1x5 convs (the paper's "between all convolutions"), PReLU in the decoder too (the code uses ReLU there),
dropout 0.1 in the decoder (the paper's "p = 0.1 afterwards"; the code has none), and a 3x3 final fullconv
(the code's is 2x2) so that both learned upsamplings are one kind of layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec, parse_norm
from orchestrator.models.layers import conv, init_conv_weights
from orchestrator.models.norms import make_act, make_norm, norm_act

ACT = "prelu"  # one slope per channel, as the authors'


class ZeroUpsample(nn.Module):
    """x at twice the height and width, with zeros between and after its values.

    A stride-2 transposed 3x3 conv (padding 1, output padding 1) is exactly this followed by a stride-1 3x3
    conv with the kernel flipped: written so, the decoder's learned upsampling is a conv from the conv factory
    (weight-standardized under +ws like every other conv before a norm).
    """

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        up = x.new_zeros(batch, channels, 2 * height, 2 * width)
        up[:, :, ::2, ::2] = x
        return up


class InitialBlock(nn.Module):
    """concat(3x3 stride-2 conv to 13 channels, 2x2 max-pool of the 3 input channels) -> norm -> PReLU."""

    def __init__(self, norm: NormSpec) -> None:
        super().__init__()
        self.conv = conv(3, 13, 3, stride=2, norm=norm)
        self.pool = nn.MaxPool2d(2)
        self.norm_act = nn.Sequential(*norm_act(norm, 16, ACT))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_act(torch.cat([self.conv(x), self.pool(x)], dim=1))


class Bottleneck(nn.Module):
    """x + extension(x) -> PReLU; the extension's middle conv is a 3x3 (dilated by `dilation`) or, when
    `asymmetric`, a 5x1 then a 1x5 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: NormSpec,
        dropout: float,
        dilation: int = 1,
        asymmetric: bool = False,
        stride: int = 1,
    ) -> None:
        super().__init__()
        internal = out_channels // 4
        if asymmetric:
            middle = [
                conv(internal, internal, (5, 1), norm=norm),
                *norm_act(norm, internal, ACT),
                conv(internal, internal, (1, 5), norm=norm),
            ]
        else:
            middle = [conv(internal, internal, 3, dilation=dilation, norm=norm)]
        # A downsampling bottleneck's projection is a 2x2 stride-2 conv instead of a 1x1 (paper, section 3).
        self.ext = nn.Sequential(
            conv(in_channels, internal, stride, stride=stride, norm=norm),
            *norm_act(norm, internal, ACT),
            *middle,
            *norm_act(norm, internal, ACT),
            conv(internal, out_channels, 1, norm=norm),
            make_norm(norm, out_channels),
            nn.Dropout2d(dropout),
        )
        self.act = make_act(norm, out_channels, ACT)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.ext(x))


class DownsamplingBottleneck(Bottleneck):
    """Shortcut: 2x2 max-pool, zero feature maps up to `out_channels`; returns the output and the pool's
    indices, which the decoder unpools with."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: NormSpec, dropout: float) -> None:
        super().__init__(in_channels, out_channels, norm=norm, dropout=dropout, stride=2)
        self.pad_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shortcut, indices = F.max_pool2d(x, 2, return_indices=True)
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
        return self.act(shortcut + self.ext(x)), indices


class UpsamplingBottleneck(nn.Module):
    """Shortcut: 1x1 conv + norm, max-unpooled to the encoder's max locations; extension: 1x1 projection,
    stride-2 transposed 3x3 conv, 1x1 expansion; sum, PReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: NormSpec, dropout: float) -> None:
        super().__init__()
        internal = out_channels // 4
        self.shortcut = nn.Sequential(
            conv(in_channels, out_channels, 1, norm=norm), make_norm(norm, out_channels)
        )
        self.ext = nn.Sequential(
            conv(in_channels, internal, 1, norm=norm),
            *norm_act(norm, internal, ACT),
            ZeroUpsample(),
            conv(internal, internal, 3, norm=norm),
            *norm_act(norm, internal, ACT),
            conv(internal, out_channels, 1, norm=norm),
            make_norm(norm, out_channels),
            nn.Dropout2d(dropout),
        )
        self.act = make_act(norm, out_channels, ACT)

    def forward(self, x: Tensor, indices: Tensor) -> Tensor:
        shortcut = F.max_unpool2d(self.shortcut(x), indices, kernel_size=2)
        return self.act(shortcut + self.ext(x))


def _dilated_stage(norm: NormSpec) -> nn.Sequential:
    """Bottlenecks x.1-x.8 of stages 2 and 3: regular, dilated 2, asymmetric 5, dilated 4, regular,
    dilated 8, asymmetric 5, dilated 16."""
    kinds = [{}, {"dilation": 2}, {"asymmetric": True}, {"dilation": 4}]
    kinds += [{}, {"dilation": 8}, {"asymmetric": True}, {"dilation": 16}]
    return nn.Sequential(*(Bottleneck(128, 128, norm=norm, dropout=0.1, **kind) for kind in kinds))


class ENetEncoder(nn.Module):
    """Images [B, 3, H, W] -> {"out": [B, 128, H/8, W/8], "indices1", "indices2": the max-pool indices of
    bottlenecks 1.0 and 2.0, for the decoder's unpooling}. H and W must be multiples of 8."""

    def __init__(self, norm: NormSpec) -> None:
        super().__init__()
        self.initial = InitialBlock(norm)
        # Spatial dropout p = 0.01 before bottleneck 2.0, 0.1 from there on (paper, section 4).
        self.down1 = DownsamplingBottleneck(16, 64, norm=norm, dropout=0.01)
        self.stage1 = nn.Sequential(*(Bottleneck(64, 64, norm=norm, dropout=0.01) for _ in range(4)))
        self.down2 = DownsamplingBottleneck(64, 128, norm=norm, dropout=0.1)
        self.stage2 = _dilated_stage(norm)
        self.stage3 = _dilated_stage(norm)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            # Odd sizes would misalign the initial block's two branches and the unpooling.
            raise ValueError(f"ENet needs height and width divisible by 8, got {tuple(x.shape[-2:])}")
        x, indices1 = self.down1(self.initial(x))
        x, indices2 = self.down2(self.stage1(x))
        return {"out": self.stage3(self.stage2(x)), "indices1": indices1, "indices2": indices2}


class ENetDecoder(nn.Module):
    """Encoder features -> logits [B, num_classes, H, W]: stages 4 and 5 unpool with the encoder's indices of
    2.0 and 1.0; the fullconv (a transposed conv; no norm after it, so never standardized) doubles to the
    input size."""

    def __init__(self, num_classes: int, norm: NormSpec) -> None:
        super().__init__()
        self.up4 = UpsamplingBottleneck(128, 64, norm=norm, dropout=0.1)
        self.stage4 = nn.Sequential(*(Bottleneck(64, 64, norm=norm, dropout=0.1) for _ in range(2)))
        self.up5 = UpsamplingBottleneck(64, 16, norm=norm, dropout=0.1)
        self.stage5 = Bottleneck(16, 16, norm=norm, dropout=0.1)
        self.fullconv = nn.Sequential(ZeroUpsample(), conv(16, num_classes, 3, bias=True))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        x = self.stage4(self.up4(features["out"], features["indices2"]))
        return self.fullconv(self.stage5(self.up5(x, features["indices1"])))


class ENet(nn.Module):
    """Images [B, 3, H, W] -> logits [B, num_classes, H, W]; other sizes than multiples of 8 are padded.

    `.backbone` (initial block, stages 1-3) and `.head` (stages 4-5, fullconv) get separate LRs in training.
    Every norm comes from `make_norm`; with `+ws` every conv before a norm is weight-standardized.
    """

    def __init__(self, num_classes: int = 3, *, norm: str | NormSpec = "bn") -> None:
        super().__init__()
        norm = parse_norm(norm)
        self.backbone = ENetEncoder(norm)
        self.head = ENetDecoder(num_classes, norm)
        init_conv_weights(self)
        # As DeepLab's classifier: small weights start the logits near uniform (Kaiming's fan-out on a
        # 3-output layer would start them large).
        nn.init.normal_(self.head.fullconv[1].weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        # The encoder needs multiples of 8: pad at the bottom and right with zeros (the mean colour of a
        # normalized image), and crop the logits back to the input's size.
        height, width = x.shape[-2:]
        logits = self.head(self.backbone(F.pad(x, (0, -width % 8, 0, -height % 8))))
        return logits[..., :height, :width]


def enet(num_classes: int = 3, **kwargs) -> ENet:
    """The whole model the catalog names `enet` (its head is its own decoder)."""
    return ENet(num_classes, **kwargs)
