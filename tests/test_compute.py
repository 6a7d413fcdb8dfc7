"""orchestrator/compute.py against independent formulas: convolution FLOPs forward and backward, GPU peaks
by device name, and the activation bytes counted on the meta device against those autograd saves for real."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orchestrator.compute import count_flops, step_cost
from orchestrator.gpus import peak_flops


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise, as DeepLabv3+'s separable ASPP
        nn.Conv2d(16, 32, 1, groups=4, bias=False),
        nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, groups=2, bias=False),
    ],
    ids=["plain", "strided-dilated", "depthwise", "grouped", "transposed"],
)
def test_conv_flops_are_two_per_multiply_add_and_backward_twice_forward(conv: nn.Conv2d) -> None:
    x = torch.randn(2, conv.in_channels, 10, 12)
    y = conv(x)
    # Every output (input, for a transposed conv) position applies the filter: C_in / groups x k x k
    # multiply-adds for each of C_out channels.
    at = x if isinstance(conv, nn.ConvTranspose2d) else y
    per_position = conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    forward = 2 * x.shape[0] * per_position * math.prod(at.shape[2:])
    assert count_flops(lambda: conv(x)) == forward
    # Backward: the weight's gradient, and the input's when it needs one, each as large as the forward.
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward
    x.requires_grad_(True)
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA L40S", None),  # not an L4
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name: str, peak: float | None) -> None:
    assert peak_flops(name) == peak


@pytest.mark.parametrize("norm", ["bn", "gn:c16+ws", "evalnorm", "frozenbn"])
def test_activation_bytes_counted_on_the_meta_device_are_what_autograd_saves_for_real(norm: str) -> None:
    """The estimate of `orchestrator plan` (shapes only) against a real CPU forward at a small crop."""
    real, meta, images, masks = _twins(norm)
    estimate = step_cost(meta, images.to("meta"), masks.to("meta"))
    assert estimate.activation_bytes == _saved_for_real(real, images, masks) > 0
    assert estimate.flops == count_flops(
        lambda: nn.functional.cross_entropy(real(images), masks, ignore_index=255).backward()
    )
    assert estimate.parameters == sum(p.numel() for p in real.parameters())


class _SavesAView(nn.Module):
    """A product of a tensor and a view of it: autograd keeps both, one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * y.view(y.shape)


def test_a_storage_autograd_keeps_twice_counts_once() -> None:
    images, masks = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    with torch.device("meta"):
        model = _SavesAView()
    cost = step_cost(model, images.to("meta"), masks.to("meta"), flops=False)
    # The image (saved by the conv), the conv's output once, the product's log-softmax, the int64 masks and
    # nll_loss's total weight (a 0-d float).
    logits = 2 * 3 * 4 * 5
    assert cost.activation_bytes == 4 * images.numel() + 4 * logits * 2 + 8 * masks.numel() + 4


def test_norms_and_bfloat16_add_no_flops() -> None:
    """What lets `orchestrator plan` count FLOPs once per architecture: every kind of norm layer, weight
    standardization and the dtype leave the convolutions and matrix products as they are."""
    from orchestrator.models.build import build_model

    counts = set()
    for norm, dtype in [("bn", torch.float32), ("bn", torch.bfloat16), ("gn:c16+ws", torch.float32),
                        ("evalnorm:rule", torch.float32), ("ibn-a", torch.float32), ("in", torch.float32),
                        ("ln", torch.float32), ("frozenbn", torch.float32)]:  # fmt: skip
        with torch.device("meta"):
            model = build_model("resnet18", "deeplabv3plus", norm=norm).to(dtype).train()
        images, masks = torch.empty(1, 3, 48, 64, dtype=dtype), torch.empty(1, 48, 64, dtype=torch.long)
        counts.add(step_cost(model, images.to("meta"), masks.to("meta")).flops)
    assert len(counts) == 1


@pytest.mark.parametrize("norm", ["bn", "bn+ws", "evalnorm:rule", "frozenbn"])
def test_autocasts_casts_on_the_meta_device_save_what_a_real_autocast_saves(norm: str) -> None:
    """compute.Autocast with the CPU's policy on meta tensors against torch.autocast on the CPU at a small
    crop: the storages autograd keeps, the bf16 weight copies the convolutions save among them. (GN, IN and
    LN are left out: for bfloat16 inputs their CPU kernels keep float32 statistics where the meta kernels
    keep bfloat16; under the CUDA policy they run in float32, where both agree.)"""
    from orchestrator.compute import CPU_AUTOCAST

    real, meta, images, masks = _twins(norm)
    with torch.autocast("cpu", torch.bfloat16):
        saved = _saved_for_real(real, images, masks)
    estimate = step_cost(meta, images.to("meta"), masks.to("meta"), flops=False, autocast=CPU_AUTOCAST)
    assert estimate.activation_bytes == saved > 2 * estimate.parameters  # the bf16 weight copies among them


def _twins(norm: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A ResNet-18 DeepLabv3+ on the CPU and one on the meta device, and a small batch."""
    from orchestrator.models.build import build_model

    torch.manual_seed(0)
    real = build_model("resnet18", "deeplabv3plus", norm=norm).train()
    with torch.device("meta"):
        meta = build_model("resnet18", "deeplabv3plus", norm=norm).train()
    return real, meta, torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))


def _saved_for_real(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> int:
    """The bytes of the storages autograd keeps in a real forward, told apart by their memory address,
    parameters and buffers left out: an independent count of what compute.step_cost counts."""
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        nn.functional.cross_entropy(model(images), masks, ignore_index=255)
    return sum(saved.values())


def test_the_autocast_policies_name_ops_torch_autocasts_on_that_device() -> None:
    """Each name of a policy that is an aten op has an autocast kernel for that device in the installed torch,
    and the ops our models reach with one are in the policy (a stale or mistyped name fails here)."""
    from orchestrator.compute import CPU_AUTOCAST, CUDA_AUTOCAST

    def autocasts(name: str, key: str) -> bool | None:
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", key)
        except RuntimeError:  # no such op, or only overloads: a Python name (interpolate, cross_entropy)
            return None

    for policy, key in ((CUDA_AUTOCAST, "AutocastCUDA"), (CPU_AUTOCAST, "AutocastCPU")):
        names = policy.lower | policy.fp32 | policy.promote
        assert all(autocasts(name, key) is not False for name in names), key
        for name in ("conv2d", "group_norm", "layer_norm", "batch_norm", "cat", "nll_loss2d", "max_unpool2d"):
            assert bool(autocasts(name, key)) == (name in names or name == "nll_loss2d"), (key, name)
    assert "interpolate" in CUDA_AUTOCAST.fp32 and autocasts("upsample_bilinear2d", "AutocastCUDA")
    assert "cross_entropy" in CPU_AUTOCAST.fp32 and autocasts("cross_entropy_loss", "AutocastCPU")


class _SameConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_a_weight_used_twice_is_cast_once_as_autocast_caches_it() -> None:
    from orchestrator.compute import CPU_AUTOCAST

    torch.manual_seed(0)
    real = _SameConvTwice()
    with torch.device("meta"):
        meta = _SameConvTwice()
    images, masks = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    with torch.autocast("cpu", torch.bfloat16):
        real_cost = step_cost(real, images, masks, flops=False)
    emulated = step_cost(meta, images.to("meta"), masks.to("meta"), flops=False, autocast=CPU_AUTOCAST)
    assert emulated == real_cost
