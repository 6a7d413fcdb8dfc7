"""Xception-65 and DRN-D backbones: parameter counts against the published ones, forward/backward per norm,
output strides and dilations, every norm from make_norm, and the reference key layouts (timm, fyu/drn)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from orchestrator.models import layers, norms, resnet, xception
from orchestrator.models.catalog import parse_norm
from orchestrator.models.drn import DRN
from orchestrator.models.evalnorm import evalnorm_aux_loss
from orchestrator.models.layers import StdConv2d
from orchestrator.models.norms import IBN
from orchestrator.models.xception import Xception65

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "xception65": Xception65,
    "drn_d_22": lambda **kwargs: DRN("drn_d_22", **kwargs),
    "drn_d_105": lambda **kwargs: DRN("drn_d_105", **kwargs),
}
# name -> (low channels, out channels, output stride by default)
FEATURES = {"xception65": (256, 2048, 16), "drn_d_22": (64, 512, 8), "drn_d_105": (256, 512, 8)}

# Published totals with the ImageNet classifier, and that classifier's parameters (weight + bias): timm's
# xception65 39.92M (a 2048x1000 fc); DRN paper Table 1, DRN-D-22 16.4M and DRN-D-105 54.8M (a 512x1000 fc).
PUBLISHED = {
    "xception65": (39.92e6, 2048 * 1000 + 1000),
    "drn_d_22": (16.4e6, 512 * 1000 + 1000),
    "drn_d_105": (54.8e6, 512 * 1000 + 1000),
}


def _parameter_count(name: str, norm: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return sum(p.numel() for p in BUILDERS[name](norm=norm).parameters())


@pytest.mark.parametrize("name", BUILDERS)
def test_parameter_count_matches_the_published(name: str) -> None:
    published, classifier = PUBLISHED[name]
    count = _parameter_count(name, "bn")
    assert abs(count + classifier - published) / published < 0.02, count
    # GN and BN both hold a per-channel affine (2C); only BN's running stats (buffers) differ.
    assert _parameter_count(name, "gn:c16") == count


NORMS = ("bn", "syncbn", "gn:c16", "gn:g32+ws", "evalnorm")
CASES = [(name, norm, FEATURES[name][2]) for name in BUILDERS for norm in NORMS] + [("xception65", "bn", 8)]


@pytest.mark.parametrize(("name", "norm", "output_stride"), CASES)
def test_forward_backward(name: str, norm: str, output_stride: int) -> None:
    torch.manual_seed(0)
    net = BUILDERS[name](norm=norm, output_stride=output_stride).train()
    features = net(torch.randn(2, 3, 64, 64))
    low_channels, out_channels, _ = FEATURES[name]
    assert (net.low_channels, net.out_channels) == (low_channels, out_channels)
    assert features["low"].shape == (2, low_channels, 16, 16)
    side = 64 // output_stride
    assert features["out"].shape == (2, out_channels, side, side)
    assert all(torch.isfinite(f).all() for f in features.values())
    assert (features["out"] >= 0).all()  # every backbone ends in a ReLU
    loss = (features["out"] * torch.randn_like(features["out"])).mean()
    if norm == "evalnorm":  # its alpha/beta learn from EvalNorm's auxiliary loss alone
        loss = loss + evalnorm_aux_loss(net)
    loss.backward()
    for key, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, key


# The module whose output is "low": Xception's entry block 2 second separable conv (DeepLab's decoder end
# point entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise), DRN's level 3.
LOW_MODULES = {
    "xception65": lambda net: net.blocks[1].stack.conv2,
    "drn_d_22": lambda net: net.layer3,
    "drn_d_105": lambda net: net.layer3,
}


@pytest.mark.parametrize("name", BUILDERS)
def test_low_features_are_the_decoder_end_point(name: str) -> None:
    net = BUILDERS[name]().eval()
    captured = []
    LOW_MODULES[name](net).register_forward_hook(lambda module, args, output: captured.append(output))
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


def test_drn_dilations_and_fixed_output_stride() -> None:
    with torch.device("meta"):
        net = DRN("drn_d_22")
    expected = {"layer3": {1}, "layer4": {1}, "layer5": {2}, "layer6": {4}, "layer7": {2}, "layer8": {1}}
    assert {name: _dilations(getattr(net, name)) for name in expected} == expected
    with pytest.raises(ValueError, match="drn_d_105 has output stride 8 by design .* got output_stride 16"):
        DRN("drn_d_105", output_stride=16)
    with pytest.raises(ValueError, match="unknown backbone 'drn_d_38'; allowed: drn_d_22, drn_d_105"):
        DRN("drn_d_38")


@pytest.mark.parametrize("name", BUILDERS)
def test_every_norm_comes_from_make_norm(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[nn.Module] = []

    def recording(*args, **kwargs) -> nn.Module:
        made.append(norms.make_norm(*args, **kwargs))
        return made[-1]

    for module in (xception, layers, resnet):  # every module that builds our backbones' norms
        monkeypatch.setattr(module, "make_norm", recording)
    with torch.device("meta"):
        net = BUILDERS[name](norm="bn")
    found = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm)]
    assert found and {id(m) for m in found} == {id(m) for m in made}


@pytest.mark.parametrize("name", BUILDERS)
def test_group_norm_with_weight_standardization(name: str) -> None:
    with torch.device("meta"):
        net = BUILDERS[name](norm="gn:g32+ws")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    group_norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(group_norms) == len(convs)  # one norm after every conv
    assert all(m.num_groups == math.gcd(32, m.num_channels) for m in group_norms)
    # Every conv but Xception's depthwise ones is standardized (see xception.SeparableConv2d).
    depthwise = [m for m in convs if m.groups > 1]
    assert all(m.groups == m.in_channels == m.out_channels and type(m) is nn.Conv2d for m in depthwise)
    assert all(isinstance(m, StdConv2d) for m in convs if m.groups == 1)
    assert len(depthwise) == (21 * 3 if name == "xception65" else 0)


def test_instance_norm_placement() -> None:
    with torch.device("meta"):
        net = DRN("drn_d_22", norm="ibn-a")
    has_ibn = {
        name: any(isinstance(m, IBN) for m in getattr(net, name).modules()) for name in ("layer3", "layer6")
    }
    assert has_ibn == {"layer3": True, "layer6": False}
    assert all(
        isinstance(block.bn1, IBN) for name in ("layer3", "layer4", "layer5") for block in getattr(net, name)
    )
    with pytest.raises(
        ValueError, match="'ibn-a' places instance norm in ResNet stages; xception65 has none"
    ):
        Xception65(norm="ibn-a")


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
# fyu/drn's names (drn.py: `layer0`..`layer2` and `layer7`/`layer8` flat conv, BN, ReLU lists; ResNet blocks
# in `layer3`..`layer6`).
DRN_D_22_KEYS = {
    "layer0.0.weight": (16, 3, 7, 7),
    "layer0.1.running_var": (16,),
    "layer1.0.weight": (16, 16, 3, 3),
    "layer2.0.weight": (32, 16, 3, 3),
    "layer3.0.conv1.weight": (64, 32, 3, 3),
    "layer3.0.downsample.0.weight": (64, 32, 1, 1),
    "layer3.1.bn2.weight": (64,),
    "layer5.0.downsample.1.bias": (256,),
    "layer6.1.conv2.weight": (512, 512, 3, 3),
    "layer7.0.weight": (512, 512, 3, 3),
    "layer8.1.num_batches_tracked": (),
}
DRN_D_105_KEYS = {
    "layer0.0.weight": (16, 3, 7, 7),
    "layer3.0.conv1.weight": (64, 32, 1, 1),
    "layer3.0.conv3.weight": (256, 64, 1, 1),
    "layer3.0.downsample.0.weight": (256, 32, 1, 1),
    "layer5.22.conv3.weight": (1024, 256, 1, 1),
    "layer6.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer7.0.weight": (512, 2048, 3, 3),
    "layer8.0.weight": (512, 512, 3, 3),
}


@pytest.mark.parametrize(
    ("name", "expected", "count", "absent"),
    [
        # 132 convs (2 stem, 21 x 3 x 2 separable, 4 shortcuts), each with a BN of 5 tensors
        ("xception65", XCEPTION_KEYS, 132 * 6, XCEPTION_ABSENT),
        # 25 convs (3 stem, 4 levels x (2 x 2 + 1 shortcut), 2 degridding) with a BN each
        ("drn_d_22", DRN_D_22_KEYS, 25 * 6, ["layer3.0.conv3.weight", "layer7.0.conv1.weight", "fc.weight"]),
        # 108 convs (3 stem, 33 bottlenecks x 3, 4 shortcuts, 2 degridding) with a BN each
        (
            "drn_d_105",
            DRN_D_105_KEYS,
            108 * 6,
            ["layer5.23.conv1.weight", "layer6.3.conv1.weight", "fc.weight"],
        ),
    ],
)
def test_state_dict_uses_the_reference_names(
    name: str, expected: dict, count: int, absent: list[str]
) -> None:
    with torch.device("meta"):
        state = BUILDERS[name]().state_dict()
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not set(absent) & state.keys()
    assert len(state) == count  # the reference's state_dict less its classifier
