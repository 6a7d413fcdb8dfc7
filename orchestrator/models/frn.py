"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, CVPR 2020): a norm of
each image's own channel, with an activation of its own that replaces the model's.

For each image and channel, over its H x W responses x (Eq. 1-3 of the paper):

    nu^2 = mean(x^2)
    y    = gamma * x / sqrt(nu^2 + eps) + beta
    z    = max(y, tau)                            (TLU, a learned threshold tau per channel)

No mean is subtracted (TLU's learned threshold takes that role) and nothing depends on the other images, so
training and evaluation compute the same thing at any batch size. The paper learns eps only for 1x1 maps;
every map these models normalize is larger, so eps is the paper's constant 1e-6.

A model built with `frn` gets FRN where it has a norm and TLU where it has an activation (`norms.make_act`):
after a norm that is the paper's FRN layer; after a residual sum or before a pre-activated conv, where
ResNet-v1 and Xception place a ReLU no norm precedes, a TLU of its own (as the FRN re-implementation on
classic ResNet did). A norm that no activation follows stays plain FRN, as the paper's layers without one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec

EPS = 1e-6


class FilterResponseNorm2d(nn.Module):
    """FRN over (H, W) of each image and channel; affine `weight` (gamma) and `bias` (beta) per channel,
    named as BatchNorm's so that a BN checkpoint's affine loads into it."""

    def __init__(self, num_features: int, eps: float = EPS) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> FilterResponseNorm2d:
        return cls(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        return _FilterResponseNorm.apply(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class TLU(nn.Module):
    """max(x, tau) with a learned threshold `tau` per channel, 0 at the start (ReLU until it learns)."""

    NOT_PRETRAINED = ("tau",)  # starts as the ReLU a pretrained file's weights were trained with

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return _Threshold.apply(x, self.tau)

    def extra_repr(self) -> str:
        return str(self.num_features)


class _FilterResponseNorm(torch.autograd.Function):
    """FRN's forward and its gradient, keeping for the backward only the input and 1 / sqrt(nu^2 + eps)
    per map: autograd over the plain ops would also keep a float32 copy of a half-precision input (for
    nu^2) and the normalized map, twice BN's activations.

    With r = (nu^2 + eps)^-1/2, x^ = x r and g^ = dL/dy * gamma, over the n = H W responses of a map:
    dL/dx = r (g^ - x^ mean(g^ x^)); dL/dgamma = sum(dL/dy x^); dL/dbeta = sum(dL/dy).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        # In float32 at least: the square of a float16 response overflows from |x| = 256.
        wide = torch.promote_types(x.dtype, torch.float32)
        r = torch.rsqrt(x.to(wide).square().mean(dim=(2, 3), keepdim=True) + eps)
        ctx.save_for_backward(x, r, weight)
        scale = (r * weight.to(wide).view(1, -1, 1, 1)).to(x.dtype)
        return torch.addcmul(bias.to(x.dtype).view(1, -1, 1, 1), x, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, r, weight = ctx.saved_tensors
        grad, xhat = grad.to(r.dtype), x.to(r.dtype) * r
        ghat = grad * weight.to(r.dtype).view(1, -1, 1, 1)
        dx = r * (ghat - xhat * (ghat * xhat).mean(dim=(2, 3), keepdim=True))
        dweight = (grad * xhat).sum(dim=(0, 2, 3)).to(weight.dtype)
        dbias = grad.sum(dim=(0, 2, 3)).to(weight.dtype)
        return dx.to(x.dtype), dweight, dbias, None


class _Threshold(torch.autograd.Function):
    """max(x, tau), keeping its output for the backward, as an in-place ReLU does: the next conv keeps that
    same tensor, so the activation costs no map of its own (autograd's maximum would keep its input).
    Where x == tau the gradient goes to tau, as ReLU's to nothing at 0."""

    @staticmethod
    def forward(ctx, x: Tensor, tau: Tensor) -> Tensor:
        out = torch.maximum(x, tau.to(x.dtype).view(1, -1, 1, 1))
        ctx.save_for_backward(out, tau)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        out, tau = ctx.saved_tensors
        passed = out > tau.to(out.dtype).view(1, -1, 1, 1)
        return grad * passed, grad.masked_fill(passed, 0).sum(dim=(0, 2, 3)).to(tau.dtype)
