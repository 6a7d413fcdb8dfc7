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
    """The estimate of `orchestrator plan` (shapes only) against a real CPU forward at a small crop: the
    storages autograd keeps, told apart by their memory address, parameters and buffers left out."""
    from orchestrator.models.build import build_model

    torch.manual_seed(0)
    real = build_model("resnet18", "deeplabv3plus", norm=norm).train()
    with torch.device("meta"):
        meta = build_model("resnet18", "deeplabv3plus", norm=norm).train()
    images, masks = torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))
    held = {t.untyped_storage().data_ptr() for t in (*real.parameters(), *real.buffers())}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        nn.functional.cross_entropy(real(images), masks, ignore_index=255)
    estimate = step_cost(meta, images.to("meta"), masks.to("meta"))
    assert estimate.activation_bytes == sum(saved.values()) > 0
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
