"""WiderResNet38-A2 (mapillary's layout): pre-activation blocks, the stride/dilation plan, every norm from the
factory and where the norms sit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models.norms import FrozenBatchNorm2d, make_norm
from orchestrator.models.wider_resnet import WiderResNet38

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, FrozenBatchNorm2d)
# Norms: per block an input norm and one before each later conv (15 two-conv + 2 bottleneck blocks), bn_out.
WIDER_RESNET38_NORMS = 15 * 2 + 2 * 3 + 1


@pytest.mark.parametrize("norm", ["bn", "gn:c16", "evalnorm"])
def test_every_norm_is_the_specs(norm: str) -> None:
    with torch.device("meta"):
        net = WiderResNet38(norm=norm)
    norms = [m for m in net.modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == WIDER_RESNET38_NORMS
    assert all(type(m) is type(make_norm(norm, 16)) for m in norms)


# (stride of block1's first conv, dilation of the 3x3 convs) per stage: the reference A2 at 8.
WIDER_RESNET_PLANS = {
    8: {"mod4": (2, 1), "mod5": (1, 2), "mod6": (1, 4), "mod7": (1, 4)},
    16: {"mod4": (2, 1), "mod5": (2, 1), "mod6": (1, 2), "mod7": (1, 2)},
}


@pytest.mark.parametrize("output_stride", [8, 16])
def test_wider_resnet_dilates_instead_of_striding(output_stride: int) -> None:
    net = WiderResNet38(output_stride=output_stride)
    for name, (stride, dilation) in WIDER_RESNET_PLANS[output_stride].items():
        blocks = list(getattr(net, name))
        assert blocks[0].convs.conv1.stride[0] == stride
        assert blocks[0].proj_conv.stride[0] == stride
        for block in blocks:
            convs3x3 = [m for m in block.convs if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
            assert convs3x3 and all(m.dilation == (dilation, dilation) for m in convs3x3)
            assert all(m.stride == (1, 1) for m in block.convs[1:] if isinstance(m, nn.Conv2d))


def test_wider_resnet_blocks_are_pre_activation() -> None:
    net = WiderResNet38(norm="gn:c16").eval()
    block = net.mod2.block2  # 128 -> 128: identity shortcut
    # The input norm sees the block's input width (a post-activation block normalizes its conv outputs).
    assert net.mod2.block1.bn1.num_channels == 64
    # Identity mapping: with the residual branch silenced the block passes x through, negatives included
    # (no activation after the sum).
    nn.init.zeros_(block.convs.conv2.weight)
    x = torch.randn(1, 128, 8, 8)
    assert torch.equal(block(x), x)
    # A projecting block projects the pre-activated input (norm, then the reference's leaky ReLU 0.01).
    first = net.mod2.block1
    nn.init.zeros_(first.convs.conv2.weight)
    x = torch.randn(1, 64, 8, 8)
    torch.testing.assert_close(first(x), first.proj_conv(F.leaky_relu(first.bn1(x), 0.01)))
