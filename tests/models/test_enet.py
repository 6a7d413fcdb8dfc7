"""ENet (the authors' Torch code): its size, stage shapes, padding, spatial dropout, the backbone/head split,
and the decoder's unpooling and zero-upsampling convs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models.catalog import parse_norm
from orchestrator.models.enet import ENet, UpsamplingBottleneck, ZeroUpsample
from orchestrator.models.layers import conv
from orchestrator.models.norms import FrozenBatchNorm2d, make_norm

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, FrozenBatchNorm2d)
# ENet as the authors' Torch code (e-lab/ENet-training encoder.lua + decoder.lua) with 3 classes, counted by
# hand: 363,271 (the catalog holds the paper's 0.37M).
ENET_AUTHORS_PARAMS = 363_271
# Norms: initial block 1; 23 regular bottlenecks (4 + 8 + 8 + 2 + 1) x 3, +1 in each of the 4 asymmetric
# ones; 2 downsampling x 3; 2 upsampling x 4 (one on the unpooled shortcut).
ENET_NORMS = 1 + 23 * 3 + 4 + 2 * 3 + 2 * 4


def test_enet_parameter_count_matches_the_authors_code() -> None:
    count = sum(p.numel() for p in ENet(3).parameters())
    assert abs(count - ENET_AUTHORS_PARAMS) / ENET_AUTHORS_PARAMS < 0.005


@pytest.mark.parametrize("norm", ["bn", "gn:c16", "evalnorm"])
def test_every_norm_is_the_specs(norm: str) -> None:
    norms = [m for m in ENet(3, norm=norm).modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == ENET_NORMS
    assert all(type(m) is type(make_norm(norm, 16)) for m in norms)


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
