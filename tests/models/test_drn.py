"""DRN-D (fyu/drn's layout): the decoder's low-level end point, dilations at a fixed output stride 8,
IBN-a placement in its ResNet levels, and fyu/drn's key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.models.drn import DRN
from orchestrator.models.norms import IBN


def _dilations(module: nn.Module) -> set[int]:
    return {m.dilation[0] for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}


@pytest.mark.parametrize("name", ["drn_d_22", "drn_d_105"])
def test_low_features_are_level_3(name: str) -> None:
    net = DRN(name).eval()
    captured = []
    net.layer3.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        low = net(torch.randn(1, 3, 32, 32))["low"]
    assert torch.equal(low, captured[0])


def test_drn_dilations_and_fixed_output_stride() -> None:
    with torch.device("meta"):
        net = DRN("drn_d_22")
    expected = {"layer3": {1}, "layer4": {1}, "layer5": {2}, "layer6": {4}, "layer7": {2}, "layer8": {1}}
    assert {name: _dilations(getattr(net, name)) for name in expected} == expected
    with pytest.raises(ValueError, match="drn_d_105 has output stride 8 by design .* got output_stride 16"):
        DRN("drn_d_105", output_stride=16)
    with pytest.raises(ValueError, match="unknown backbone 'drn_d_38'; allowed: drn_d_22, drn_d_105"):
        DRN("drn_d_38")


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
def test_state_dict_uses_fyu_drns_names(name: str, expected: dict, count: int, absent: list[str]) -> None:
    with torch.device("meta"):
        state = DRN(name).state_dict()
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not set(absent) & state.keys()
    assert len(state) == count  # the reference's state_dict less its classifier
