"""Batch Renormalization (Ioffe, NeurIPS 2017, Algorithm 1): BatchNorm whose training output is corrected
towards the moving statistics, so that it depends less on the few images of a batch.

In training, with the batch's mean mu_B and sigma_B = sqrt(var_B + eps) (biased variance) and the moving
mu and sigma:

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    mu    += momentum * (mu_B - mu)
    sigma += momentum * (sigma_B - sigma)

and in inference y = gamma * (x - mu) / sigma + beta. With r_max = 1 and d_max = 0 it is BatchNorm; the
paper's schedule keeps it so for the first 5000 steps, then relaxes r_max to 3 at 40k steps and d_max to 5
at 25k steps (linearly here: the paper says "gradually").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec

# The paper's schedule, in training steps: r_max = 1, d_max = 0 until RELAX_FROM, then linearly to their
# limits at R_MAX_AT and D_MAX_AT.
R_MAX, D_MAX = 3.0, 5.0
RELAX_FROM, R_MAX_AT, D_MAX_AT = 5_000, 40_000, 25_000


def clip_limits(step: Tensor) -> tuple[Tensor, Tensor]:
    """(r_max, d_max) at training step `step` (0-based) of the paper's schedule, on step's device: no host
    sync in a training step, and shapes alone on the meta device (plan's memory count)."""
    relaxed = (step.float() - RELAX_FROM).clamp(min=0)
    r = 1.0 + (R_MAX - 1.0) * (relaxed / (R_MAX_AT - RELAX_FROM)).clamp(max=1.0)
    d = D_MAX * (relaxed / (D_MAX_AT - RELAX_FROM)).clamp(max=1.0)
    return r, d


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization on BatchNorm2d's parameters and buffers: `running_var` holds sigma^2 - eps, so
    that eval, a BN state_dict and BN's conversions stay BatchNorm2d's. `renorm_steps` (a buffer, kept in
    checkpoints) counts the training forwards the schedule has run: with `train.accumulate: K`, K per
    optimizer step. Forwards without grad (PreciseBN's statistics pass) are BatchNorm2d's."""

    NOT_PRETRAINED = ("renorm_steps",)  # starts at 0 whatever the weights

    def __init__(self, num_features: int, **bn_kwargs) -> None:
        super().__init__(num_features, **bn_kwargs)
        self.register_buffer("renorm_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> BatchRenorm2d:
        return cls(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled() and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        r_max, d_max = clip_limits(self.renorm_steps)
        self.renorm_steps.add_(1)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        with torch.no_grad():
            var_b, mean_b = torch.var_mean(x.float(), [0, *range(2, x.dim())], correction=0)
            sigma_b = (var_b + self.eps).sqrt()
            sigma = (self.running_var.float() + self.eps).sqrt()
            r = torch.minimum(torch.maximum(sigma_b / sigma, r_max.reciprocal()), r_max)
            d = torch.minimum(torch.maximum((mean_b - self.running_mean.float()) / sigma, -d_max), d_max)
            self.running_mean.lerp_(mean_b.to(self.running_mean.dtype), momentum)
            self.running_var.copy_(sigma.lerp(sigma_b, momentum).square() - self.eps)
        # gamma * (xhat_B * r + d) + beta is BatchNorm's xhat_B under the affine (gamma r, gamma d + beta):
        # BatchNorm's own kernel, memory and backward, r and d constants in it.
        weight, bias = (self.weight * r, self.bias + self.weight * d) if self.affine else (r, d)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
