"""The heads: DeepLabv3+ (separable ASPP and decoder), DeepLabv3 (plain atrous ASPP), FCN (a classifier),
their structure, parameter count, classifier init, and heads that belong to one backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models import catalog, deeplab
from orchestrator.models.build import build_model

SHARED_HEADS = tuple(h for h in catalog.HEADS if h not in catalog.OWN_HEADS)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    with torch.device("meta"):
        model = build_model("resnet101", "deeplabv3plus")
    assert n_params(model.head) == expected == 3_183_219
    assert n_params(model) == catalog.BACKBONES["resnet101"].parameters + expected


def test_batch_of_one_trains_with_batch_norm() -> None:
    # The study runs batch 1 per GPU: the image-pooling branch (a 1x1 map) must not hold a BatchNorm.
    model = build_model("resnet18", norm="bn").train()
    logits = model(torch.randn(1, 3, 64, 64))
    logits.sum().backward()
    assert logits.shape == (1, 3, 64, 64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.head.aspp.pool.modules())


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


@pytest.mark.parametrize(("head", "stride"), [("deeplabv3plus", 4), ("deeplabv3", 16), ("fcn", 16)])
def test_heads_give_logits_at_their_stride(head: str, stride: int) -> None:
    with torch.device("meta"):
        model = build_model("resnet18", head)
        logits = model.head(model.backbone(torch.empty(2, 3, 64, 96)))
    assert logits.shape == (2, 3, 64 // stride, 96 // stride)


@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_deeplabv3plus_aspp_and_decoder_convs_are_depthwise_separable(
    output_stride: int, rates: tuple[int, ...]
) -> None:
    with torch.device("meta"):
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


def test_a_head_that_belongs_to_a_backbone_fits_only_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As ENet's: its own head, valid with it alone. Stand-ins here: fcn as resnet50's own head.
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
