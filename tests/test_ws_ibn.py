"""Weight Standardization (StdConv2d vs the paper's formula; which convs of a `+ws` model get it) and the
placement of IBN-Net-a's mixed norms in the ResNets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models import layers, resnet
from orchestrator.models.build import build_model
from orchestrator.models.layers import StdConv2d, conv
from orchestrator.models.norms import IBN


def paper_ws(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 2 of Qiao et al., Weight Standardization, with eps inside the sqrt of the (biased) variance, in
    float64: each output channel's (in, kh, kw) weights to zero mean and unit variance."""
    flat = w.double().flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def test_standardized_weight_has_zero_mean_and_unit_variance_per_output_channel() -> None:
    torch.manual_seed(0)
    layer = conv(8, 6, 3, ws=True)
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
    layer = conv(4, 5, 3, ws=True, **kwargs)
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
    # ENVIRONMENT.md: the mean/std form made a step 1.8x slower than F.layer_norm over each output channel.
    calls, layer_norm = [], F.layer_norm

    def spy(x: torch.Tensor, normalized_shape: tuple[int, ...], *args, **kwargs) -> torch.Tensor:
        calls.append((tuple(x.shape), tuple(normalized_shape)))
        return layer_norm(x, normalized_shape, *args, **kwargs)

    layer = conv(256, 256, 3, ws=True)
    monkeypatch.setattr(layers.F, "layer_norm", spy)
    layer(torch.randn(1, 256, 8, 8)).square().mean().backward()
    assert calls == [((256, 256 * 9), (256 * 9,))]
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(("backbone", "norm"), [("resnet18", "gn:g32+ws"), ("resnet50", "bn+ws")])
def test_ws_models_standardize_every_conv_followed_by_a_norm(backbone: str, norm: str) -> None:
    model = build_model(backbone, norm=norm)
    convs = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plain = {name for name, kind in convs.items() if kind is nn.Conv2d}
    # Nothing normalizes the outputs of the classifier and of the image-pooling conv: they stay plain.
    assert plain == {"head.classifier", "head.aspp.pool.1"}
    assert {convs[name] for name in convs.keys() - plain} == {StdConv2d}
    assert convs["backbone.conv1"] is StdConv2d  # the stem too
    assert not any(
        isinstance(m, StdConv2d) for m in build_model(backbone, norm=norm[: -len("+ws")]).modules()
    )


# blocks per stage: (layer1, layer2, layer3, layer4)
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("norm", "rest"), [("ibn-a", nn.BatchNorm2d), ("ign-a:c16", nn.GroupNorm)])
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
            if rest is nn.GroupNorm:
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
