"""ResNet-101/152, ResNet-D (timm's deep stem and average-pool shortcuts), multi-grid, and the three heads
(DeepLabv3+ with separable convs, DeepLabv3, FCN): parameter counts against the published ones, structure,
forward/backward under representative norms, torchvision-layout checkpoints."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_checks import check_trains
from torch import nn

from orchestrator.models import catalog, deeplab, resnet
from orchestrator.models.build import BACKBONE_BUILDERS, build_model
from orchestrator.models.layers import StdConv2d

# The heads any backbone takes (not a whole model's own, such as ENet's).
SHARED_HEADS = tuple(h for h in catalog.HEADS if h not in catalog.OWN_HEADS)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# torchvision's published totals (its docs' "num_params") less the ImageNet fc (in x 1000 + 1000).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512 - (512 * 1000 + 1000),
    "resnet50": 25_557_032 - (2048 * 1000 + 1000),
    "resnet101": 44_549_160 - (2048 * 1000 + 1000),
    "resnet152": 60_192_808 - (2048 * 1000 + 1000),
}
# ResNet-D's stem replaces the 7x7 conv (3 -> 64) by 3x3 convs 3 -> 32 -> 32 -> 64 with two more norms
# (weight, bias) of 32; its shortcuts' average pools have no parameters.
DEEP_STEM_EXTRA = (3 * 32 + 32 * 32 + 32 * 64) * 9 + 2 * 2 * 32 - 3 * 64 * 7 * 7


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        *TORCHVISION_PARAMS.items(),
        # timm's resnet50d / resnet101d: 25,576,264 / 44,568,392 with the fc
        ("resnet50d", TORCHVISION_PARAMS["resnet50"] + DEEP_STEM_EXTRA),
        ("resnet101d", TORCHVISION_PARAMS["resnet101"] + DEEP_STEM_EXTRA),
    ],
)
def test_backbone_parameter_counts_match_the_published(backbone: str, expected: int) -> None:
    net = BACKBONE_BUILDERS[backbone](norm=catalog.parse_norm("bn"), output_stride=16)
    assert n_params(net) == expected


def test_deeplabv3plus_head_parameter_count() -> None:
    # On ResNet-101 (2048 "out" channels, 256 "low" channels); every norm a BN (weight + bias).
    def separable(c_in: int, c_out: int) -> int:  # depthwise 3x3 + norm, pointwise 1x1 + norm
        return c_in * 9 + 2 * c_in + c_in * c_out + 2 * c_out

    expected = (
        2048 * 256 + 2 * 256  # ASPP 1x1 branch
        + 3 * separable(2048, 256)  # ASPP atrous branches
        + 2048 * 256 + 256  # image pooling: biased conv, no norm
        + 5 * 256 * 256 + 2 * 256  # ASPP projection of the 5 branches
        + 256 * 48 + 2 * 48  # low-level projection
        + separable(256 + 48, 256) + separable(256, 256)  # decoder
        + 256 * 3 + 3  # classifier
    )  # fmt: skip
    model = build_model("resnet101", "deeplabv3plus")
    assert n_params(model.head) == expected == 3_183_219
    assert n_params(model) == TORCHVISION_PARAMS["resnet101"] + expected


# Representative norms: batch statistics (local and synced), groups (by channels and by count, with WS),
# IBN's mixed halves, EvalNorm (trained through its auxiliary loss).
HEAD_NORMS = ("bn", "syncbn", "gn:c16", "gn:g32+ws", "ibn-a", "evalnorm")


@pytest.mark.parametrize(
    ("head", "backbone", "norm", "output_stride"),
    [
        *(
            (h, b, n, 16)
            for h, b, n in itertools.product(SHARED_HEADS, ("resnet18", "resnet101"), HEAD_NORMS)
        ),
        *((h, "resnet18", "bn", 8) for h in SHARED_HEADS),
        ("deeplabv3plus", "resnet152", "gn:c16", 16),
        ("deeplabv3plus", "resnet50d", "bn", 8),
        ("fcn", "resnet101d", "gn:c16", 16),
    ],
)
def test_heads_forward_and_backward(head: str, backbone: str, norm: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, head, norm=norm, output_stride=output_stride).train()
    x = torch.randn(2, 3, 64, 64)
    # The head's logits, before the model upsamples them: DeepLabv3+ at the decoder's stride 4, the others at
    # the output stride.
    side = 64 // (4 if head == "deeplabv3plus" else output_stride)
    assert model.head(model.backbone(x)).shape == (2, 3, side, side)
    check_trains(model, x)
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0  # the gradient reaches the stem


@pytest.mark.parametrize("head", SHARED_HEADS)
def test_classifier_starts_small_and_unbiased(head: str) -> None:
    # Kaiming fan-out on the 3-output classifier would give std sqrt(2/3); the heads start it at 0.01.
    classifier = build_model("resnet18", head).head.classifier
    assert 0.008 < classifier.weight.std().item() < 0.012
    assert classifier.kernel_size == (1, 1) and (classifier.bias == 0).all()
    assert type(classifier) is nn.Conv2d


def test_fcn_head_is_a_1x1_classifier_on_the_final_features_upsampled_bilinearly() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "fcn", output_stride=8).eval()
    x = torch.randn(1, 3, 40, 56)
    w, b = model.head.classifier.weight, model.head.classifier.bias
    with torch.no_grad():
        w.normal_()  # so that a missing or misplaced classifier shows
        b.normal_()
        expected = F.interpolate(
            F.conv2d(model.backbone(x)["out"], w, b), size=(40, 56), mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_deeplabv3plus_aspp_and_decoder_convs_are_depthwise_separable(
    output_stride: int, rates: tuple[int, ...]
) -> None:
    head = build_model("resnet101", "deeplabv3plus", output_stride=output_stride).head
    for branch, rate in zip(head.aspp.branches[1:], rates, strict=True):
        depthwise, pointwise = branch[0], branch[3]
        assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (2048, 2048, 2048)
        assert depthwise.kernel_size == (3, 3) and depthwise.dilation == depthwise.padding == (rate, rate)
        assert isinstance(branch[1], nn.BatchNorm2d) and isinstance(branch[2], nn.ReLU)
        assert (pointwise.in_channels, pointwise.out_channels, pointwise.kernel_size) == (2048, 256, (1, 1))
        assert (
            pointwise.groups == 1 and isinstance(branch[4], nn.BatchNorm2d) and isinstance(branch[5], nn.ReLU)
        )
    decoder_depthwise = [layer[0] for layer in head.fuse]
    assert [(c.groups, c.in_channels, c.dilation) for c in decoder_depthwise] == [
        (304, 304, (1, 1)),
        (256, 256, (1, 1)),
    ]
    assert [layer[3].out_channels for layer in head.fuse] == [256, 256]
    assert head.low_project[0].out_channels == 48


@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_deeplabv3_aspp_uses_plain_atrous_convs(output_stride: int, rates: tuple[int, ...]) -> None:
    head = deeplab.DeepLabV3Head(256, 2048, 3, output_stride=output_stride)
    atrous = [branch[0] for branch in head.aspp.branches[1:]]
    assert [(c.groups, c.kernel_size, c.dilation[0], c.out_channels) for c in atrous] == [
        (1, (3, 3), r, 256) for r in rates
    ]
    assert not hasattr(head, "fuse") and head.classifier.in_channels == 256


def test_separable_convs_standardize_depthwise_and_pointwise_weights_under_ws() -> None:
    head = build_model("resnet18", "deeplabv3plus", norm="gn:c16+ws").head
    branch = head.aspp.branches[1]
    assert type(branch[0]) is StdConv2d and type(branch[3]) is StdConv2d
    assert isinstance(branch[1], nn.GroupNorm) and branch[1].num_groups == 512 // 16


# (blocks' 3x3-conv dilations in layer4 without multi-grid, with multi_grid=(1, 2, 4)) per output stride
MULTI_GRID_PLANS = {16: ([1, 2, 2], [2, 4, 8]), 8: ([2, 4, 4], [4, 8, 16])}


@pytest.mark.parametrize("output_stride", catalog.OUTPUT_STRIDES)
def test_multi_grid_multiplies_layer4_dilation_by_the_unit_rates(output_stride: int) -> None:
    plain, grid = MULTI_GRID_PLANS[output_stride]
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


def test_resnet_d_stem_is_weight_standardized_under_ws() -> None:
    net = build_model("resnet50d", norm="gn:g32+ws").backbone
    assert [type(net.conv1[i]) for i in (0, 3, 6)] == [StdConv2d] * 3
    assert type(net.layer2[0].downsample[1]) is StdConv2d


def _torchvision_resnet101_file(path: Path) -> resnet.ResNet:
    """Save a ResNet-101 state_dict as torchvision lays it out (with its fc); returns a model holding it."""
    torch.manual_seed(2)
    source = resnet.ResNet("resnet101").eval()
    with torch.no_grad():
        for name, value in source.state_dict().items():
            if name.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.02)  # distinct from any fresh init
    state = source.state_dict() | {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    torch.save(state, path)
    return source


def test_torchvision_resnet101_checkpoint_reproduces_the_backbone(tmp_path: Path) -> None:
    source = _torchvision_resnet101_file(tmp_path / "r101.pth")
    model = build_model("resnet101", "deeplabv3plus", pretrained=str(tmp_path / "r101.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = source(x), model.backbone(x)
    assert torch.isfinite(expected["out"]).all() and expected["out"].abs().max() > 0
    for key in ("low", "out"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_checkpoint_of_another_depth_names_the_first_wrong_shape(tmp_path: Path) -> None:
    # ResNet-101 weights into ResNet-18: in the model's order, the first misfit is layer1.0.conv1 (1x1, 3x3).
    torch.save(resnet.ResNet("resnet101").state_dict(), tmp_path / "r101.pth")
    with pytest.raises(ValueError) as error:
        build_model("resnet18", pretrained=str(tmp_path / "r101.pth"))
    message = str(error.value)
    assert "do not fit the model's shapes" in message
    misfits = re.findall(r"([\w.]+): file (\([\d, ]*\)), model (\([\d, ]*\))", message)
    assert misfits[0] == ("layer1.0.conv1.weight", "(64, 64, 1, 1)", "(64, 64, 3, 3)")


def test_wrong_shapes_are_listed_in_the_models_order(tmp_path: Path) -> None:
    state = resnet.ResNet("resnet101").state_dict()
    for key in ("layer3.2.conv2.weight", "layer3.10.conv2.weight"):
        state[key] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        build_model("resnet101", pretrained=str(tmp_path / "bad.pth"))
    message = str(error.value)
    assert message.index("layer3.2.conv2.weight") < message.index("layer3.10.conv2.weight")


def test_a_head_that_belongs_to_a_backbone_fits_only_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As ENet will: its own head, valid with it alone. Stand-ins here: fcn as resnet50's own head.
    monkeypatch.setattr(catalog, "OWN_HEADS", {"fcn": "resnet50"})
    assert build_model("resnet50", "fcn").head.classifier.in_channels == 2048
    with pytest.raises(
        ValueError, match="head 'fcn' belongs to backbone 'resnet50'; it does not fit backbone 'resnet18'"
    ):
        build_model("resnet18", "fcn")
    with pytest.raises(
        ValueError, match="backbone 'resnet50' takes only its own head 'fcn', not head 'deeplabv3'"
    ):
        build_model("resnet50", "deeplabv3")
