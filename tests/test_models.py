"""ResNet-18/50 with the DeepLabv3+ head: shapes and gradients for every norm x output stride, torchvision
key names, pretrained loading from a file and from an fsspec URL. The deeper ResNets, ResNet-D and the other
heads: test_resnet_heads.py."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import fsspec
import pytest
import torch
from model_checks import check_trains
from torch import nn

from orchestrator.models import catalog, deeplab, pretrained, resnet
from orchestrator.models.build import BACKBONE_BUILDERS, HEAD_BUILDERS, WHOLE_MODELS, build_model

NORMS = ("bn", "gn:g8", "gn:c16", "syncbn")
LATER_NORMS = (
    "in",
    "ln",
    "frozenbn",
    "gn:g32+ws",
    "bn+ws",
    "ibn-a",
    "ign-a:c16",
    "evalnorm",
    "evalnorm:rule",
)
# resnet18/50 x norm x output stride for the first norms; the later ones on resnet18 at both output strides
# and on resnet50 at 16, so that the file stays under ~30 s.
FORWARD_CASES = [
    *itertools.product(("resnet18", "resnet50"), NORMS, catalog.OUTPUT_STRIDES),
    *(
        (b, norm, stride)
        for b, stride in [("resnet18", 8), ("resnet18", 16), ("resnet50", 16)]
        for norm in LATER_NORMS
    ),
]


@pytest.mark.parametrize(("backbone", "norm", "output_stride"), FORWARD_CASES)
def test_forward_backward(backbone: str, norm: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, norm=norm, output_stride=output_stride).train()
    x = torch.randn(2, 3, 64, 64)
    features = model.backbone(x)
    assert features["low"].shape == (2, model.backbone.low_channels, 16, 16)
    side = 64 // output_stride
    assert features["out"].shape == (2, model.backbone.out_channels, side, side)
    check_trains(model, x)
    assert model.backbone.conv1.weight.grad.abs().sum() > 0  # the gradient reaches the stem


def test_batch_of_one_trains_with_batch_norm() -> None:
    # The study runs batch 1 per GPU: the image-pooling branch (a 1x1 map) must not hold a BatchNorm.
    model = build_model("resnet18", norm="bn").train()
    logits = model(torch.randn(1, 3, 64, 64))
    logits.sum().backward()
    assert logits.shape == (1, 3, 64, 64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.head.aspp.pool.modules())


@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_rates_follow_the_output_stride(output_stride: int, rates: tuple[int, ...]) -> None:
    head = deeplab.DeepLabV3PlusHead(64, 512, 3, output_stride=output_stride)
    assert tuple(branch[0].dilation[0] for branch in head.aspp.branches[1:]) == rates


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
    state = resnet.ResNet(name).state_dict()
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not set(absent) & state.keys()
    assert len(state) == count  # torchvision's state_dict less fc.weight and fc.bias


def test_catalog_names_what_build_model_builds() -> None:
    # The spec validates against the torch-free catalog; build_model builds from its dicts: the same names.
    assert set(BACKBONE_BUILDERS) | set(WHOLE_MODELS) == set(catalog.BACKBONES)
    assert not set(BACKBONE_BUILDERS) & set(WHOLE_MODELS)
    assert set(HEAD_BUILDERS) | set(catalog.OWN_HEADS) == set(catalog.HEADS)
    assert set(catalog.OWN_HEADS) <= set(catalog.HEADS)
    assert set(catalog.OWN_HEADS.values()) <= set(catalog.BACKBONES)


def test_residual_blocks_start_as_identity() -> None:
    net = resnet.ResNet("resnet50", norm="gn:g8")
    assert all(block.bn3.weight.abs().sum() == 0 for stage in (net.layer1, net.layer4) for block in stage)
    assert (net.layer1[0].bn1.weight == 1).all() and (net.bn1.bias == 0).all()
    # A frozen norm's zero gamma would never train back: frozenbn blocks keep their residual branch.
    assert all((block.bn2.weight == 1).all() for block in resnet.ResNet("resnet18", norm="frozenbn").layer1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "resnet34"}, "unknown backbone 'resnet34'; allowed: resnet18, resnet50, resnet101, "),
        (
            {"backbone": "resnet18", "head": "pspnet"},
            "unknown head 'pspnet'; allowed: deeplabv3plus, deeplabv3, fcn",
        ),
        ({"backbone": "resnet18", "norm": "gn:x3"}, "unknown norm 'gn:x3'; allowed: bn, syncbn"),
        (
            {"backbone": "resnet18", "output_stride": 32},
            "unknown output_stride 32 for backbone 'resnet18'; allowed: 8, 16",
        ),
    ],
)
def test_build_model_rejects_unknown_names(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def _torchvision_like_file(path: str, norm: str = "bn", **open_kwargs) -> dict[str, torch.Tensor]:
    """A resnet18 state_dict with an fc layer, as torchvision saves it; returns what was saved."""
    torch.manual_seed(1)
    state = resnet.ResNet("resnet18", norm=norm).state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.normal_()  # distinct from any fresh init
    state |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    with fsspec.open(path, "wb", **open_kwargs) as f:
        torch.save(state, f)
    return state


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_pretrained_round_trips(tmp_path: Path, scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    url = {
        "path": str(tmp_path / "r18.pth"),
        "file": f"file://{tmp_path}/r18.pth",
        "memory": f"memory://weights-{tmp_path.name}/r18.pth",
    }[scheme]
    saved = _torchvision_like_file(url)
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        model = build_model("resnet18", pretrained=url, storage_options={})
    loaded = model.backbone.state_dict()
    assert loaded.keys() == saved.keys() - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    assert "loaded 120 of 120 tensors" in caplog.text and "fc.weight" in caplog.text


def test_pretrained_batch_norm_weights_into_group_norm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = _torchvision_like_file(str(tmp_path / "r18.pth"))
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        model = build_model("resnet18", norm="gn:g8", pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.layer2[0].bn1.weight, saved["layer2.0.bn1.weight"])
    assert torch.equal(model.backbone.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert "loaded 60 of 60 tensors" in caplog.text  # 20 convs, 20 norms x (weight, bias)
    assert "dropped 60 BN statistics" in caplog.text  # running stats: GN keeps none


def test_pretrained_without_matching_names_raises(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no tensor name in .* matches"):
        build_model("resnet18", pretrained=str(path))


def test_pretrained_of_another_architecture_names_the_shapes(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(resnet.ResNet("resnet50").state_dict(), path)
    with pytest.raises(
        ValueError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\), model \(64, 64, 3, 3\)"
    ):
        build_model("resnet18", pretrained=str(path))
