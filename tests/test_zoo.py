"""The model zoo as the grid sees it: every backbone x head x representative norm through build_model,
and each backbone's size against its published parameter count."""

from __future__ import annotations

import pytest
import torch
from model_checks import check_trains

from orchestrator.models.build import build_model
from orchestrator.models.catalog import BACKBONES, HEADS, IBN_BACKBONES, OWN_HEADS, check_pairing

# Backbone parameters without the ImageNet classifier (BN), and where the number comes from.
PUBLISHED = {
    "resnet18": (11_689_512 - 513_000, 0.0),  # torchvision, minus fc
    "resnet50": (25_557_032 - 2_049_000, 0.0),
    "resnet101": (44_549_160 - 2_049_000, 0.0),  # ~42.5M
    "resnet152": (60_192_808 - 2_049_000, 0.0),
    "resnet50d": (25_576_264 - 2_049_000, 0.0),  # timm
    "resnet101d": (44_568_392 - 2_049_000, 0.0),
    "xception65": (39_920_000 - 2_049_000, 0.005),  # timm reports 39.92M with its 2048x1000 fc
    "drn_d_22": (16_400_000 - 513_000, 0.01),  # DRN paper 16.4M with its 512x1000 fc
    "drn_d_105": (54_800_000 - 513_000, 0.01),
    "wider_resnet38": (105_070_912, 0.0),  # mapillary's wider_resnet38_a2 without its classifier
    "enet": (370_000, 0.02),  # ENet paper: 0.37M, the whole model (3 classes here)
}
NORMS = ("bn", "syncbn", "gn:c16", "gn:g32+ws", "ibn-a", "evalnorm")


def combinations() -> list[tuple[str, str, str]]:
    out = []
    for backbone in BACKBONES:
        for head in HEADS:
            try:
                check_pairing(backbone, head)
            except ValueError:
                continue
            out += [(backbone, head, n) for n in NORMS if n != "ibn-a" or backbone in IBN_BACKBONES]
    return out


def test_the_table_covers_every_backbone():
    assert set(PUBLISHED) == set(BACKBONES)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_parameter_count_matches_the_published_one(backbone: str) -> None:
    model = build_model(backbone, norm="bn")
    part = model if backbone in OWN_HEADS.values() else model.backbone
    expected, tolerance = PUBLISHED[backbone]
    count = sum(p.numel() for p in part.parameters())
    assert abs(count - expected) <= tolerance * expected, f"{backbone}: {count:,} vs {expected:,}"


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "head", "norm"), combinations())
def test_forward_backward(backbone: str, head: str, norm: str) -> None:
    torch.manual_seed(0)
    check_trains(build_model(backbone, head, norm=norm).train(), torch.randn(2, 3, 64, 96))
