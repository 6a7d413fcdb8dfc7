"""Batch Renormalization against Ioffe 2017's Algorithm 1, written out here with plain tensor ops: r and d
clipped by the schedule and held constant in the gradient, the moving mean and sigma, inference as BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.models.batch_renorm import BatchRenorm2d, clip_limits
from orchestrator.models.norms import make_norm
from orchestrator.train.precise_bn import precise_bn

EPS, MOMENTUM = 1e-5, 0.1


@pytest.mark.parametrize(
    ("step", "limits"),
    [(0, (1.0, 0.0)), (5_000, (1.0, 0.0)), (22_500, (2.0, 4.375)), (25_000, (1 + 2 * 20 / 35, 5.0)),
     (40_000, (3.0, 5.0)), (10**6, (3.0, 5.0))],
)  # fmt: skip
def test_the_schedule_relaxes_r_max_to_3_at_40k_steps_and_d_max_to_5_at_25k(step, limits) -> None:
    assert tuple(map(float, clip_limits(torch.tensor(step)))) == pytest.approx(limits)


def layer(steps: int) -> BatchRenorm2d:
    norm = BatchRenorm2d(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        # Moving statistics far from the batch's in channels 0 and 1 (r and d clip), near in 2 and 3.
        norm.running_mean.copy_(torch.tensor([-30.0, 3.0, 1.1, 0.9]))
        norm.running_var.copy_(torch.tensor([100.0, 0.01, 4.2, 3.8]))
        norm.renorm_steps.fill_(steps)
    return norm.train()


def algorithm_1(norm: BatchRenorm2d, x: torch.Tensor, r_max: float, d_max: float):
    """y, the new moving mean and the new moving sigma^2 - eps."""
    c = (None, slice(None), None, None)
    mu_b = x.mean((0, 2, 3))
    sigma_b = ((x - mu_b[c]).square().mean((0, 2, 3)) + EPS).sqrt()
    mu, sigma = norm.running_mean.clone(), (norm.running_var + EPS).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mu) / sigma).clamp(-d_max, d_max).detach()
    y = norm.weight[c] * ((x - mu_b[c]) / sigma_b[c] * r[c] + d[c]) + norm.bias[c]
    mu = mu + MOMENTUM * (mu_b.detach() - mu)
    sigma = sigma + MOMENTUM * (sigma_b.detach() - sigma)
    return y, mu, sigma.square() - EPS


@pytest.mark.parametrize("steps", [0, 4_999, 30_000, 50_000])
def test_training_follows_algorithm_1(steps: int) -> None:
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 2 + 1
    norm, reference = layer(steps), layer(steps)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = norm(x1)
    expected, mu, var = algorithm_1(reference, x2, *map(float, clip_limits(torch.tensor(steps))))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_mean, mu)
    torch.testing.assert_close(norm.running_var, var)
    assert int(norm.renorm_steps) == steps + 1
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (expected * w).sum().backward()
    for got, want in [(x1.grad, x2.grad), (norm.weight.grad, reference.weight.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if steps >= 30_000:  # r and d clip in the far channels: unclipped, they would give another output
        unclipped, _, _ = algorithm_1(layer(steps), x, float("inf"), float("inf"))
        assert not torch.allclose(y[:, :2], unclipped[:, :2], atol=1e-3)


def test_before_the_schedule_relaxes_it_trains_as_batchnorm() -> None:
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    norm, bn = layer(0), nn.BatchNorm2d(4).train()
    bn.load_state_dict(norm.state_dict(), strict=False)
    torch.testing.assert_close(norm(x), bn(x))
    torch.testing.assert_close(norm.running_mean, bn.running_mean)


def test_inference_and_preciseBN_are_batchnorms_and_keep_the_step_count() -> None:
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    norm, bn = layer(30_000), nn.BatchNorm2d(4)
    bn.load_state_dict(norm.state_dict(), strict=False)
    torch.testing.assert_close(norm.eval()(x), bn.eval()(x))
    net, reference = nn.Sequential(norm), nn.Sequential(bn)
    assert precise_bn(net, [x, x + 1], 2) == precise_bn(reference, [x, x + 1], 2) == 2
    torch.testing.assert_close(norm.running_var, bn.running_var)
    assert int(norm.renorm_steps) == 30_000  # statistics passes are not training steps


def test_the_spec_builds_it_and_a_batchnorm_state_loads() -> None:
    norm = make_norm("brn", 4)
    assert type(norm) is BatchRenorm2d
    missing = norm.load_state_dict(nn.BatchNorm2d(4).state_dict(), strict=False).missing_keys
    assert missing == ["renorm_steps"] and "renorm_steps" in BatchRenorm2d.NOT_PRETRAINED
