"""The conv factory: Weight Standardization against the paper's formula, and the one place that decides which
convs get it (those a norm follows, never a depthwise conv or the classifier), in every model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models import catalog, layers
from orchestrator.models.build import build_model
from orchestrator.models.catalog import parse_norm
from orchestrator.models.layers import StdConv2d, conv

WS = parse_norm("gn:g32+ws")


def paper_ws(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 2 of Qiao et al., Weight Standardization, with eps inside the sqrt of the (biased) variance, in
    float64: each output channel's (in, kh, kw) weights to zero mean and unit variance."""
    flat = w.double().flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def test_standardized_weight_has_zero_mean_and_unit_variance_per_output_channel() -> None:
    torch.manual_seed(0)
    layer = conv(8, 6, 3, norm=WS)
    with torch.no_grad():
        layer.weight.mul_(300).add_(torch.arange(6.0).reshape(6, 1, 1, 1))  # variance ~1, offset means
    w = layer.standardized_weight().double().flatten(1)
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        w.var(dim=1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "weight_scale"), [({"stride": 2, "bias": True}, 1.0), ({"dilation": 2}, 0.01)]
)
def test_std_conv_is_a_conv_with_the_standardized_weight(kwargs: dict, weight_scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = conv(4, 5, 3, norm=WS, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * weight_scale + weight_scale)
    x = torch.randn(2, 4, 9, 11, generator=gen, dtype=torch.float64)
    dy = torch.randn_like(layer(x.float()), dtype=torch.float64)

    weight = layer.weight.detach().double().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().double()
    expected = F.conv2d(x, paper_ws(weight, layer.eps), bias, layer.stride, layer.padding, layer.dilation)
    (expected * dy).sum().backward()
    y = layer(x.float())
    (y * dy.float()).sum().backward()
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    # The gradient flows through the standardization (Eqs. 5-6), not around it.
    torch.testing.assert_close(layer.weight.grad.double(), weight.grad, atol=1e-3, rtol=1e-3)
    assert set(layer.state_dict()) == set(nn.Conv2d(4, 5, 3, bias=layer.bias is not None).state_dict())


def test_std_conv_standardizes_with_one_layer_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    # The mean/std form made a training step 1.8x slower than F.layer_norm over each output channel.
    calls, layer_norm = [], F.layer_norm

    def spy(x: torch.Tensor, normalized_shape: tuple[int, ...], *args, **kwargs) -> torch.Tensor:
        calls.append((tuple(x.shape), tuple(normalized_shape)))
        return layer_norm(x, normalized_shape, *args, **kwargs)

    layer = conv(256, 256, 3, norm=WS)
    monkeypatch.setattr(layers.F, "layer_norm", spy)
    layer(torch.randn(1, 256, 8, 8)).square().mean().backward()
    assert calls == [((256, 256 * 9), (256 * 9,))]
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "standardized"),
    [
        ({"norm": WS}, True),
        ({"norm": WS, "groups": 2}, True),  # grouped, not depthwise
        ({"norm": WS, "groups": 8}, False),  # depthwise: a standardized 3x3 single-channel filter sums to 0
        ({"norm": parse_norm("gn:g32")}, False),
        ({}, False),  # no norm follows (a classifier)
    ],
)
def test_the_factory_decides_weight_standardization(kwargs: dict, standardized: bool) -> None:
    layer = conv(8, 8, 3, **kwargs)
    assert type(layer) is (StdConv2d if standardized else nn.Conv2d)


def test_asymmetric_kernels_are_padded_to_keep_the_size() -> None:
    layer = conv(4, 4, (5, 1), norm=WS, dilation=2)
    assert type(layer) is StdConv2d and layer.padding == (4, 0)
    assert layer(torch.randn(1, 4, 9, 7)).shape == (1, 4, 9, 7)


# Convs no norm follows, per head: they stay plain under +ws (besides the depthwise ones).
UNNORMALIZED = {
    "deeplabv3plus": {"head.classifier", "head.aspp.pool.1"},
    "deeplabv3": {"head.classifier", "head.aspp.pool.1"},
    "fcn": {"head.classifier"},
    "enet": {"head.fullconv.1"},  # ENet's logits
}


@pytest.mark.parametrize(
    ("backbone", "head"),
    sorted({(b.name, b.own_head or h) for b in catalog.BACKBONES.values() for h in ("deeplabv3plus", "fcn")}),
)
def test_ws_models_standardize_every_conv_a_norm_follows_and_no_depthwise_one(
    backbone: str, head: str
) -> None:
    with torch.device("meta"):
        model = build_model(backbone, head, norm="gn:g32+ws")
        plain_model = build_model(backbone, head, norm="gn:g32")
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    depthwise = {name for name, m in convs.items() if m.groups == m.in_channels > 1}
    plain = {name for name, m in convs.items() if type(m) is nn.Conv2d}
    assert plain == depthwise | UNNORMALIZED[head]
    if head == "deeplabv3plus":  # the separable convs of ASPP and the decoder
        assert {"head.aspp.branches.1.0", "head.fuse.0.0", "head.fuse.1.0"} <= depthwise
    if backbone == "xception65":
        assert len(depthwise - {n for n in depthwise if n.startswith("head.")}) == 21 * 3
    assert not any(isinstance(m, StdConv2d) for m in plain_model.modules())


@pytest.mark.parametrize(
    ("strides", "reduction", "output_stride", "plan"),
    [
        ((1, 2, 2, 2), 4, 16, [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]),  # ResNet: layer4 dilated
        ((1, 2, 2, 2), 4, 8, [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]),  # layer3 2, layer4 4
        ((2, 2, 2, 2), 2, 8, [(2, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]),  # DRN-D's levels 3-6
        ((2, 2, 2, 1), 4, 32, [(2, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 1)]),  # nothing to dilate
    ],
)
def test_a_stride_past_the_output_stride_becomes_dilation(strides, reduction, output_stride, plan) -> None:
    assert layers.dilation_plan(strides, reduction, output_stride) == plan
