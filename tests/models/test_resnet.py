"""ResNets (torchvision's layout) and ResNet-D (timm's): stride and dilation plans, multi-grid, the reference
key names, identity-initialized residual blocks, and IBN-Net-a's placement of instance norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.models import catalog, resnet
from orchestrator.models.build import build_model
from orchestrator.models.norms import IBN, BatchNorm2d, GroupNorm

# (stride, dilation) of resnet50's 3x3 convs in layer3/4: (first block, other blocks)
DILATION_PLANS = {
    16: {"layer3": ((2, 1), (1, 1)), "layer4": ((1, 1), (1, 2))},
    8: {"layer3": ((1, 1), (1, 2)), "layer4": ((1, 2), (1, 4))},
}


@pytest.mark.parametrize("output_stride", catalog.OUTPUT_STRIDES)
def test_dilation_replaces_stride_as_torchvision(output_stride: int) -> None:
    # As torchvision's replace_stride_with_dilation, a dilated stage's first block keeps the old dilation.
    net = resnet.ResNet("resnet50", output_stride=output_stride)
    for name, (first, others) in DILATION_PLANS[output_stride].items():
        stage = getattr(net, name)
        assert (stage[0].conv2.stride[0], stage[0].conv2.dilation[0]) == first
        assert stage[0].conv1.stride == (1, 1)  # v1.5: the stride sits on the 3x3 conv
        assert stage[0].downsample[0].stride[0] == first[0]
        assert all((b.conv2.stride[0], b.conv2.dilation[0]) == others for b in stage[1:])


# torchvision's names (from torchvision.models.resnet), written out by hand for a few layers.
RESNET18_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.bias": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_mean": (128,),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
    "layer4.1.bn2.weight": (512,),
}
RESNET50_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.weight": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer3.5.bn3.running_var": (1024,),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
}


@pytest.mark.parametrize(
    ("name", "expected", "count", "absent"),
    [
        (
            "resnet18",
            RESNET18_KEYS,
            120,
            ["layer1.0.downsample.0.weight", "layer1.0.conv3.weight", "fc.weight"],
        ),
        ("resnet50", RESNET50_KEYS, 318, ["layer3.6.conv1.weight", "layer4.3.conv1.weight", "fc.weight"]),
        # 18 keys per bottleneck (3 convs, 3 norms of 5), 6 per stage's shortcut, 6 for the stem
        (
            "resnet101",
            RESNET50_KEYS,
            33 * 18 + 4 * 6 + 6,
            ["layer3.23.conv1.weight", "layer4.3.conv1.weight"],
        ),
        (
            "resnet152",
            RESNET50_KEYS,
            50 * 18 + 4 * 6 + 6,
            ["layer2.8.conv1.weight", "layer3.36.conv1.weight"],
        ),
    ],
)
def test_state_dict_uses_torchvision_names(name: str, expected: dict, count: int, absent: list[str]) -> None:
    with torch.device("meta"):
        state = resnet.ResNet(name).state_dict()
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not set(absent) & state.keys()
    assert len(state) == count  # torchvision's state_dict less fc.weight and fc.bias


# timm's resnet50d names, written out by hand: the deep stem and the avg-pool shortcut's conv and norm.
RESNET50D_KEYS = {
    "conv1.0.weight": (32, 3, 3, 3),
    "conv1.1.weight": (32,),
    "conv1.1.running_var": (32,),
    "conv1.3.weight": (32, 32, 3, 3),
    "conv1.4.bias": (32,),
    "conv1.6.weight": (64, 32, 3, 3),
    "bn1.weight": (64,),
    "layer1.0.downsample.1.weight": (256, 64, 1, 1),
    "layer1.0.downsample.2.running_mean": (256,),
    "layer2.0.downsample.1.weight": (512, 256, 1, 1),
    "layer4.0.downsample.2.weight": (2048,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
}


@pytest.mark.parametrize(("backbone", "plain_keys"), [("resnet50d", 318), ("resnet101d", 624)])
def test_resnet_d_uses_timm_names_and_shapes(backbone: str, plain_keys: int) -> None:
    net = build_model(backbone).backbone
    state = net.state_dict()
    assert {k: tuple(state[k].shape) for k in RESNET50D_KEYS} == RESNET50D_KEYS
    assert not {"conv1.weight", "layer1.0.downsample.0.weight", "conv1.2.weight"} & state.keys()
    # torchvision's ResNet with two convs (1 key) and two norms (5 keys) more in the stem
    assert len(state) == plain_keys + 12
    assert [net.conv1[i].stride[0] for i in (0, 3, 6)] == [2, 1, 1]
    # The pool strides, the conv after it does not; stride-1 shortcuts (layer1, dilated layer4) pool nothing.
    shortcuts = [stage[0].downsample for stage in (net.layer1, net.layer2, net.layer3, net.layer4)]
    assert [type(s[0]) for s in shortcuts] == [nn.Identity, nn.AvgPool2d, nn.AvgPool2d, nn.Identity]
    assert all(s[1].stride == (1, 1) and s[1].kernel_size == (1, 1) for s in shortcuts)
    pool = shortcuts[1][0]
    assert (pool.kernel_size, pool.stride) == (2, 2)
    assert not pool.count_include_pad and pool.ceil_mode  # ceil: odd sizes match the strided 3x3 conv
    # 72 -> 18 after the stem -> 9 in layer2 -> 5 in layer3: the odd size goes through a pooled shortcut.
    assert net(torch.randn(1, 3, 72, 72))["out"].shape == (1, 2048, 5, 5)


def test_residual_blocks_start_as_identity() -> None:
    net = resnet.ResNet("resnet50", norm="gn:g8")
    assert all(block.bn3.weight.abs().sum() == 0 for stage in (net.layer1, net.layer4) for block in stage)
    assert (net.layer1[0].bn1.weight == 1).all() and (net.bn1.bias == 0).all()
    # A frozen norm's zero gamma would never train back: frozenbn blocks keep their residual branch.
    assert all((block.bn2.weight == 1).all() for block in resnet.ResNet("resnet18", norm="frozenbn").layer1)


# (blocks' 3x3-conv dilations in layer4 without multi-grid, with multi_grid=(1, 2, 4)) per output stride
MULTI_GRID_PLANS = {16: ([1, 2, 2], [2, 4, 8]), 8: ([2, 4, 4], [4, 8, 16])}


@pytest.mark.parametrize("output_stride", catalog.OUTPUT_STRIDES)
def test_multi_grid_multiplies_layer4_dilation_by_the_unit_rates(output_stride: int) -> None:
    plain, grid = MULTI_GRID_PLANS[output_stride]
    with torch.device("meta"):
        net = resnet.ResNet("resnet101", output_stride=output_stride, multi_grid=(1, 2, 4))
        reference = resnet.ResNet("resnet101", output_stride=output_stride)
    assert [block.conv2.dilation[0] for block in reference.layer4] == plain
    assert [block.conv2.dilation[0] for block in net.layer4] == grid
    assert [block.conv2.padding[0] for block in net.layer4] == grid  # keeps the feature size
    assert all(block.conv2.stride == (1, 1) for block in net.layer4)

    def dilations_before_layer4(model: nn.Module) -> dict[str, tuple[int, int]]:
        return {
            name: m.dilation
            for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not name.startswith("layer4")
        }

    assert dilations_before_layer4(net) == dilations_before_layer4(reference)


def test_multi_grid_reaches_both_convs_of_a_basic_block_through_build_model() -> None:
    net = build_model("resnet18", "fcn", multi_grid=(1, 3)).backbone
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in net.layer4] == [(2, 2), (6, 6)]
    assert net(torch.randn(1, 3, 32, 32))["out"].shape == (1, 512, 2, 2)


@pytest.mark.parametrize("multi_grid", [(1, 2, 4), (0, 1)])
def test_multi_grid_needs_one_positive_rate_per_block(multi_grid: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"one positive unit rate per block of layer4 \(2 for resnet18\)"):
        build_model("resnet18", multi_grid=multi_grid)


# blocks per stage: (layer1, layer2, layer3, layer4)
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("norm", "rest"), [("ibn-a", BatchNorm2d), ("ign-a:c16", GroupNorm)])
def test_ibn_a_mixes_instance_norm_into_the_first_norm_of_the_blocks_of_layer1_to_3(
    backbone: str, norm: str, rest: type
) -> None:
    net = resnet.ResNet(backbone, norm=norm)
    ibn = {name: m for name, m in net.named_modules() if isinstance(m, IBN)}
    depths = DEPTHS[backbone]
    assert set(ibn) == {f"layer{s + 1}.{b}.bn1" for s in range(3) for b in range(depths[s])}
    for stage, planes in zip(range(3), (64, 128, 256), strict=True):
        layer_ibn = [m for name, m in ibn.items() if name.startswith(f"layer{stage + 1}.")]
        assert len(layer_ibn) == depths[stage]
        for m in layer_ibn:
            assert (m.IN.num_channels, m.IN.num_groups) == (planes // 2, planes // 2)  # per-channel IN
            assert type(m.BN) is rest and m.BN.weight.numel() == planes - planes // 2
            if rest is GroupNorm:
                assert m.BN.num_groups == (planes - planes // 2) // 16
    others = [m for name, m in net.named_modules() if name not in ibn and not name.startswith(tuple(ibn))]
    assert {type(m) for m in others if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)} == {rest}
    state = net.state_dict()
    assert "layer1.0.bn1.IN.weight" in state and "layer3.1.bn1.BN.bias" in state  # IBN-Net's key names
    assert "layer4.0.bn1.weight" in state and "bn1.weight" in state


def test_ibn_a_head_uses_the_plain_norm() -> None:
    head = build_model("resnet18", norm="ibn-a").head
    assert not any(isinstance(m, IBN) for m in head.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
