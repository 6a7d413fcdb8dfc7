"""Aligned Xception-65 (timm's layout): the decoder's low-level end point, DeepLab's ReLU placement in
separable convs, output stride by dilation, and timm's key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.models import xception
from orchestrator.models.catalog import parse_norm
from orchestrator.models.xception import Xception65


def test_low_features_are_the_decoder_end_point() -> None:
    # Entry block 2's second separable conv: DeepLab's decoder end point
    # entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise.
    net = Xception65().eval()
    captured = []
    net.blocks[1].stack.conv2.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        low = net(torch.randn(1, 3, 32, 32))["low"]
    assert torch.equal(low, captured[0])


def test_separable_conv_relu_placement() -> None:
    x = torch.randn(2, 8, 8, 8)
    bn = parse_norm("bn")
    # DeepLab's blocks: one ReLU before the depthwise conv, none after the norms.
    pre = xception.SeparableConv2d(8, 16, stride=1, dilation=1, norm=bn, relu_first=True).eval()
    assert torch.equal(pre(x), pre(x.clamp(min=0))) and (pre(x) < 0).any()
    # The last block: a ReLU after each norm, the depthwise one included.
    post = xception.SeparableConv2d(8, 16, stride=1, dilation=1, norm=bn, relu_first=False).eval()
    inner = []
    post.conv_pw.register_forward_pre_hook(lambda module, args: inner.append(args[0]))
    assert (post(x) >= 0).all() and (inner[0] >= 0).all() and (inner[0] == 0).any()


def _dilations(module: nn.Module) -> set[int]:
    return {m.dilation[0] for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}


# Per Xception block (0-2 entry, 3-18 middle, 19-20 exit): (stride, dilation), from DeepLab's
# stack_blocks_dense: the block whose stride would pass the output stride runs at stride 1 with the rate so
# far; the rate then grows by that stride for the blocks after it.
XCEPTION_PLANS = {
    16: [(2, 1)] * 3 + [(1, 1)] * 16 + [(1, 1), (1, 2)],
    8: [(2, 1), (2, 1), (1, 1)] + [(1, 2)] * 16 + [(1, 2), (1, 4)],
}


@pytest.mark.parametrize("output_stride", [8, 16])
def test_xception_output_stride_by_dilation(output_stride: int) -> None:
    with torch.device("meta"):
        net = Xception65(output_stride=output_stride)
    # A tuple of 2 unless a block mixes dilations.
    plan = [(block.stack.conv3.conv_dw.stride[0], *_dilations(block)) for block in net.blocks]
    assert plan == XCEPTION_PLANS[output_stride]
    assert all(block.stack.conv1.conv_dw.stride[0] == 1 for block in net.blocks)  # the stride: conv3 only
    with pytest.raises(ValueError, match="unknown output_stride 32; allowed: 8, 16"):
        Xception65(output_stride=32)


# timm's xception65 names (timm/models/xception_aligned.py: `stem` of ConvNormAct `conv`/`bn`, `blocks.<i>`
# of XceptionModule with `stack.conv<k>` SeparableConv2d `conv_dw`/`bn_dw`/`conv_pw`/`bn_pw` and a ConvNormAct
# `shortcut` where the shape changes), written out by hand for a few layers.
XCEPTION_KEYS = {
    "stem.0.conv.weight": (32, 3, 3, 3),
    "stem.0.bn.running_mean": (32,),
    "stem.1.conv.weight": (64, 32, 3, 3),
    "blocks.0.shortcut.conv.weight": (128, 64, 1, 1),
    "blocks.0.shortcut.bn.num_batches_tracked": (),
    "blocks.0.stack.conv1.conv_dw.weight": (64, 1, 3, 3),
    "blocks.0.stack.conv1.bn_dw.weight": (64,),
    "blocks.0.stack.conv1.conv_pw.weight": (128, 64, 1, 1),
    "blocks.1.stack.conv2.bn_pw.bias": (256,),
    "blocks.2.stack.conv3.conv_dw.weight": (728, 1, 3, 3),
    "blocks.18.stack.conv3.conv_pw.weight": (728, 728, 1, 1),
    "blocks.19.stack.conv2.conv_pw.weight": (1024, 728, 1, 1),
    "blocks.19.shortcut.bn.running_var": (1024,),
    "blocks.20.stack.conv1.conv_dw.weight": (1024, 1, 3, 3),
    "blocks.20.stack.conv3.conv_pw.weight": (2048, 1536, 1, 1),
    "blocks.20.stack.conv3.bn_pw.weight": (2048,),
}
XCEPTION_ABSENT = [
    "blocks.3.shortcut.conv.weight",
    "blocks.20.shortcut.conv.weight",
    "blocks.21.stack.conv1.conv_dw.weight",
    "head.fc.weight",
]


def test_state_dict_uses_timms_names() -> None:
    with torch.device("meta"):
        state = Xception65().state_dict()
    assert {k: tuple(state[k].shape) for k in XCEPTION_KEYS} == XCEPTION_KEYS
    assert not set(XCEPTION_ABSENT) & state.keys()
    # 132 convs (2 stem, 21 x 3 x 2 separable, 4 shortcuts), each with a BN of 5 tensors; timm's less its fc
    assert len(state) == 132 * 6
