"""WiderResNet38-A2 and ENet: parameter counts against the references, shapes and gradients per norm, the
stride/dilation plan, pre-activation, norms and WS from the factories, ENet's dropout and unpooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models.catalog import parse_norm
from orchestrator.models.enet import ENet, UpsamplingBottleneck, ZeroUpsample
from orchestrator.models.evalnorm import evalnorm_aux_loss
from orchestrator.models.layers import StdConv2d, conv
from orchestrator.models.norms import FrozenBatchNorm2d, make_norm
from orchestrator.models.wider_resnet import WiderResNet38

NORMS = ("bn", "syncbn", "gn:c16", "gn:g32+ws", "evalnorm")
NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, FrozenBatchNorm2d)

# mapillary/inplace_abn's wider_resnet38_a2 without classifier, counted from its definition: a 3x3 stem conv
# to 64, blocks [3, 3, 6, 3, 1, 1] of widths (128,128) (256,256) (512,512) (512,1024) (512,1024,2048)
# (1024,2048,4096), an input norm (2 x C) per block, a 1x1 projection where the width changes, bn_out.
WIDER_RESNET38_A2_PARAMS = 105_070_912
# Norms: per block an input norm and one before each later conv (15 two-conv + 2 bottleneck blocks), bn_out.
WIDER_RESNET38_NORMS = 15 * 2 + 2 * 3 + 1
# Convs: the stem, 15 x 2 + 2 x 3 in the blocks, 6 projections (every stage's first block changes width).
WIDER_RESNET38_CONVS = 1 + 15 * 2 + 2 * 3 + 6

# ENet as the authors' Torch code (e-lab/ENet-training encoder.lua + decoder.lua) with 3 classes, counted by
# hand: 363,271. The paper (Paszke et al. 2016, Table 3) reports 0.37M.
ENET_AUTHORS_PARAMS = 363_271
ENET_PAPER_PARAMS = 370_000
# Norms: initial block 1; 23 regular bottlenecks (4 + 8 + 8 + 2 + 1) x 3, +1 in each of the 4 asymmetric
# ones; 2 downsampling x 3; 2 upsampling x 4 (one on the unpooled shortcut).
ENET_NORMS = 1 + 23 * 3 + 4 + 2 * 3 + 2 * 4


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def _check_gradients(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_wider_resnet_parameter_count_matches_the_reference() -> None:
    for output_stride in (8, 16):  # dilation moves, parameters do not
        net = WiderResNet38(output_stride=output_stride)
        assert sum(p.numel() for p in net.parameters()) == WIDER_RESNET38_A2_PARAMS


# The big model: forward for every norm, backward for two (+ws, and evalnorm with its auxiliary loss).
@pytest.mark.parametrize(
    ("norm", "output_stride", "backward"),
    [
        ("bn", 8, False),
        ("syncbn", 16, False),
        ("gn:c16", 8, False),
        ("gn:g32+ws", 16, True),
        ("evalnorm", 8, True),
    ],
)
def test_wider_resnet_forward_backward(norm: str, output_stride: int, backward: bool) -> None:
    torch.manual_seed(0)
    net = WiderResNet38(norm=norm, output_stride=output_stride).train()
    norms = _norm_layers(net)
    assert len(norms) == WIDER_RESNET38_NORMS
    assert all(type(m) is type(make_norm(norm, 16)) for m in norms)  # every norm from make_norm
    with torch.set_grad_enabled(backward):
        features = net(torch.randn(2, 3, 64, 64))
    side = 64 // output_stride
    assert (net.low_channels, net.out_channels) == (256, 4096)
    assert features["low"].shape == (2, 256, 16, 16)
    assert features["out"].shape == (2, 4096, side, side)
    assert all(torch.isfinite(f).all() for f in features.values())
    if backward:
        loss = features["out"].square().mean() + features["low"].square().mean()
        if norm == "evalnorm":  # its alpha/beta learn from the auxiliary loss alone
            loss = loss + evalnorm_aux_loss(net)
        loss.backward()
        _check_gradients(net)


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


def test_wider_resnet_rejects_other_output_strides() -> None:
    with pytest.raises(ValueError, match="unknown output_stride 32; allowed: 8, 16"):
        WiderResNet38(output_stride=32)


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


@pytest.mark.parametrize("model", ["wider_resnet", "enet"])
def test_weight_standardization_wraps_every_conv_before_a_norm(model: str) -> None:
    build = {"wider_resnet": WiderResNet38, "enet": ENet}[model]
    net = build(norm="gn:g32+ws")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len([m for m in net.modules() if isinstance(m, nn.GroupNorm)]) == len(_norm_layers(net))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if model == "enet":  # the fullconv produces logits: no norm after it, a plain conv
        fullconv = net.head.fullconv[1]
        assert type(fullconv) is nn.Conv2d and fullconv.bias is not None
        convs.remove(fullconv)
    else:
        assert len(convs) == WIDER_RESNET38_CONVS
    assert all(isinstance(m, StdConv2d) for m in convs)
    assert not any(isinstance(m, StdConv2d) for m in build(norm="gn:g32").modules())


def test_enet_parameter_count_matches_the_paper() -> None:
    count = sum(p.numel() for p in ENet(3).parameters())
    assert abs(count - ENET_AUTHORS_PARAMS) / ENET_AUTHORS_PARAMS < 0.005
    assert abs(count - ENET_PAPER_PARAMS) / ENET_PAPER_PARAMS < 0.05


@pytest.mark.parametrize("norm", NORMS)
def test_enet_forward_backward(norm: str) -> None:
    torch.manual_seed(0)
    model = ENet(3, norm=norm).train()
    norms = _norm_layers(model)
    assert len(norms) == ENET_NORMS
    assert all(type(m) is type(make_norm(norm, 16)) for m in norms)
    logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 3, 64, 96)
    assert torch.isfinite(logits).all()
    loss = logits.square().mean()
    if norm == "evalnorm":
        loss = loss + evalnorm_aux_loss(model)
    loss.backward()
    _check_gradients(model)


def test_enet_stage_shapes_follow_the_paper() -> None:
    # Table 1 at 512 x 512: initial 16 x 256, stage 1 64 x 128, stages 2-3 128 x 64, 4 64 x 128, 5 16 x 256.
    model = ENet(3).eval()
    expected = {
        "initial": (16, 32),
        "stage1": (64, 16),
        "stage2": (128, 8),
        "stage3": (128, 8),
        "stage4": (64, 16),
        "stage5": (16, 32),
    }
    shapes = {}
    parts = {**dict(model.backbone.named_children()), **dict(model.head.named_children())}
    for name in expected:
        parts[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.update({name: out.shape}))
    model(torch.randn(1, 3, 64, 64))
    assert {name: (s[1], s[2]) for name, s in shapes.items()} == expected


def test_enet_pads_sizes_not_divisible_by_8() -> None:
    model = ENet(3).eval()
    x = torch.randn(1, 3, 60, 69)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 60, 69)
        # Padding at the bottom-right only: the top-left logits match a run on the zero-padded input.
        padded = model(F.pad(x, (0, 3, 0, 4)))
        torch.testing.assert_close(model(x), padded[..., :60, :69])
    with pytest.raises(ValueError, match=r"divisible by 8, got \(60, 69\)"):
        model.backbone(x)  # the encoder alone needs multiples of 8


def test_enet_spatial_dropout_as_the_paper_and_off_in_eval() -> None:
    model = ENet(3)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout2d)]
    # p = 0.01 in bottlenecks 1.0-1.4, 0.1 in the 17 of stages 2-3 and the 5 of the decoder.
    assert sorted(rates) == [0.01] * 5 + [0.1] * 22
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))  # dropout draws anew each forward
        model.eval()
        assert torch.equal(model(x), model(x))


def test_enet_backbone_and_head_partition_the_parameters() -> None:
    model = ENet(3)
    backbone = {id(p) for p in model.backbone.parameters()}
    head = {id(p) for p in model.head.parameters()}
    assert not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert head and len(backbone) > len(head)


def test_zero_upsample_then_conv_is_a_transposed_conv() -> None:
    torch.manual_seed(0)
    transposed = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=False)
    forward = conv(4, 6, 3)
    with torch.no_grad():  # conv weight [out, in, kh, kw] = the transposed one's [in, out, kh, kw], flipped
        forward.weight.copy_(transposed.weight.transpose(0, 1).flip(2, 3))
    x = torch.randn(2, 4, 5, 7)
    torch.testing.assert_close(forward(ZeroUpsample()(x)), transposed(x))


def test_upsampling_puts_the_shortcut_at_the_encoders_max_locations() -> None:
    torch.manual_seed(0)
    block = UpsamplingBottleneck(8, 4, norm=parse_norm("bn"), dropout=0.0).eval()
    nn.init.zeros_(block.ext[-2].weight)  # silence the extension branch: only the unpooled shortcut remains
    pooled_input = torch.randn(1, 4, 8, 8)
    _, indices = F.max_pool2d(pooled_input, 2, return_indices=True)
    out = block(torch.randn(1, 8, 4, 4), indices)
    window_max = F.max_pool2d(pooled_input, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(out != 0, pooled_input == window_max)


def test_enet_decoder_unpools_with_the_encoders_indices() -> None:
    torch.manual_seed(0)
    model = ENet(3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = model.backbone(x)
        assert torch.equal(model.head(features), model(x))
        for key in ("indices1", "indices2"):
            # Each max moved to the other column of its 2x2 window (flat indices; the widths are even).
            changed = model.head({**features, key: features[key] ^ 1})
            assert not torch.allclose(changed, model.head(features))
