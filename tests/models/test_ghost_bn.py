"""Ghost BatchNorm against its definition (Hoffer et al. 2017): each virtual batch normalized by its own
statistics, written out here with plain tensor ops, and the running statistics BN would keep over the
virtual batches one after the other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.models.ghost_bn import GhostBatchNorm2d
from orchestrator.models.norms import make_norm

EPS, MOMENTUM = 1e-5, 0.1


def layer(virtual_batch: int, channels: int = 3) -> GhostBatchNorm2d:
    norm = GhostBatchNorm2d(channels, virtual_batch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=g))
        norm.running_mean.copy_(torch.randn(channels, generator=g))
        norm.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return norm.train()


def by_definition(norm: GhostBatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output, running mean and running variance, from the definition."""
    outs, mean, var = [], norm.running_mean.clone(), norm.running_var.clone()
    for start in range(0, x.shape[0], norm.virtual_batch):
        part = x[start : start + norm.virtual_batch]
        mu = part.mean((0, 2, 3))
        sq = (part - mu[None, :, None, None]).square()
        n = part.numel() / part.shape[1]
        biased, unbiased = sq.mean((0, 2, 3)), sq.sum((0, 2, 3)) / (n - 1)
        xhat = (part - mu[None, :, None, None]) / (biased[None, :, None, None] + EPS).sqrt()
        outs.append(xhat * norm.weight[None, :, None, None] + norm.bias[None, :, None, None])
        mean = (1 - MOMENTUM) * mean + MOMENTUM * mu.detach()
        var = (1 - MOMENTUM) * var + MOMENTUM * unbiased.detach()
    return torch.cat(outs), mean, var


@pytest.mark.parametrize(("batch", "virtual_batch"), [(5, 2), (8, 4), (6, 1)])
def test_each_virtual_batch_is_normalized_by_its_own_statistics(batch: int, virtual_batch: int) -> None:
    x = torch.randn(batch, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    norm, expected_norm = layer(virtual_batch), layer(virtual_batch)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = norm(x1)
    expected, mean, var = by_definition(expected_norm, x2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    assert int(norm.num_batches_tracked) == -(-batch // virtual_batch)  # one update per virtual batch
    # The gradients the definition gives, to the input and the affine.
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, expected_norm.weight.grad, rtol=1e-4, atol=1e-5)


def test_it_is_batchnorm_in_eval_without_grad_and_when_the_batch_fits_one_virtual_batch() -> None:
    x = torch.randn(4, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    for mode, grad, virtual_batch in [(False, True, 2), (True, False, 2), (True, True, 4), (True, True, 8)]:
        norm = layer(virtual_batch)
        reference = nn.BatchNorm2d(3)
        reference.load_state_dict(norm.state_dict())  # a ghost layer's state is a BN state
        norm.train(mode), reference.train(mode)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(norm(x), reference(x))
        torch.testing.assert_close(norm.running_var, reference.running_var)


def test_the_spec_builds_it_and_the_layout_stays_channels_last() -> None:
    norm = make_norm("ghostbn:b2", 3).train()
    assert type(norm) is GhostBatchNorm2d and norm.virtual_batch == 2
    x = torch.randn(6, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert norm(x).is_contiguous(memory_format=torch.channels_last)
