"""EvalNorm (Singh & Shrivastava): BatchNorm trained as usual, evaluated with corrected statistics.

With B samples per normalization batch, a sample's own statistics weigh 1/B in the batch statistics it was
trained with; EMA statistics leave them out. At eval EvalNorm mixes them back in (paper eqs. 5-6):

    mu_hat      = alpha * mu_i + (1 - alpha) * mu_E
    sigma_hat^2 = beta * sigma_i^2 + (1 - beta) * sigma_E^2 + beta * (1 - beta) * (mu_i - mu_E)^2

with mu_i, sigma_i^2 per sample and channel over (H, W) and mu_E, sigma_E^2 the running (EMA) statistics.
alpha, beta are one pair per layer: learned by the auxiliary loss of eqs. 7-9 (online: add
`evalnorm_aux_loss(model)` to the loss each training step; offline: `calibrate` a trained model), or the
paper's rule of thumb 1/B^2 (`rule=True`). Training outputs and all other gradients are BatchNorm2d's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec


class EvalNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose eval forward uses EvalNorm statistics; a BN state_dict loads with strict=False.

    Extra state: `train_batch_size` (buffer, the last training batch size; 0 before any) and, unless
    `rule`, the raw parameters `raw_alpha`, `raw_beta` with alpha = clamp(raw_alpha, 0, 1) (beta alike).
    A clamp rather than a sigmoid: raw starts at exactly 0, so a fresh or BN-converted layer evaluates as
    BatchNorm2d until alpha/beta are estimated, and the trainer's SGD moves alpha at its own pace, where a
    sigmoid's slope near 0 (0.007 at alpha 0.007) would all but freeze it.
    """

    # The extra state starts afresh by design, so the BN file a pretrained backbone comes from need not
    # give it (models.pretrained).
    NOT_PRETRAINED = ("raw_alpha", "raw_beta", "train_batch_size")

    def __init__(self, num_features: int, rule: bool = False, **bn_kwargs) -> None:
        super().__init__(num_features, **bn_kwargs)
        if not self.track_running_stats:
            raise ValueError("EvalNorm2d corrects running statistics: it needs track_running_stats=True")
        self.rule = rule
        self.register_buffer("train_batch_size", torch.zeros((), dtype=torch.long))
        if not rule:  # no unused parameters for the rule: DDP would wait for their gradients
            self.raw_alpha = nn.Parameter(torch.zeros(()))
            self.raw_beta = nn.Parameter(torch.zeros(()))
        self.aux_loss: Tensor | None = None

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> EvalNorm2d:
        return cls(num_channels, rule=spec.rule)

    @property
    def alpha(self) -> Tensor:
        return self._rule_value() if self.rule else _Clamp01.apply(self.raw_alpha)

    @property
    def beta(self) -> Tensor:
        return self._rule_value() if self.rule else _Clamp01.apply(self.raw_beta)

    def _rule_value(self) -> Tensor:
        if self.train_batch_size == 0:
            raise RuntimeError(
                "EvalNorm2d(rule=True) has not seen a training batch: train it, load a checkpoint that has "
                "`train_batch_size`, or set that buffer to the training batch size"
            )
        return self.train_batch_size.float().square().reciprocal()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        self.aux_loss = None  # unless this forward computes one: a stale loss would be backpropagated twice
        if not self.training:
            return self._evaluate(x)
        # Forwards without grad (PreciseBN's statistics pass, inference in train mode) are not the training
        # whose batch size the rule needs, nor a step that could train alpha/beta.
        if torch.is_grad_enabled():
            self.train_batch_size.fill_(x.shape[0])
            if not self.rule:
                self.aux_loss = self._aux_loss(x)  # before super() moves the running stats to this batch
        return super().forward(x)

    def _aux_loss(self, x: Tensor) -> Tensor:
        """Eqs. 7-9: mean |BN-normalized x - EvalNorm-normalized x|; gradients reach only alpha and beta."""
        with torch.no_grad():  # the stop-gradients on x, mu_i, sigma_i and the batch-normalized target
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            var_i, mu_i = torch.var_mean(xf, dim=(2, 3), correction=0)
            # Batch statistics from the per-sample ones (eqs. 3-4 over equal-sized samples): BN's biased ones.
            mu_b = mu_i.mean(0)
            var_b = var_i.mean(0) + (mu_i - mu_b).square().mean(0)
            target = (xf - mu_b[:, None, None]) * torch.rsqrt(var_b + self.eps)[:, None, None]
        mu_hat, var_hat = self._estimate(mu_i, var_i)
        return _L1ToTarget.apply(xf, target, mu_hat, torch.rsqrt(var_hat + self.eps))

    def _estimate(self, mu_i: Tensor, var_i: Tensor) -> tuple[Tensor, Tensor]:
        """Eqs. 5-6: per (sample, channel) mean and variance for normalization, from running statistics."""
        # Copies: a training forward updates the buffers in place after the aux loss's graph has saved them.
        mu_e, var_e = self.running_mean.clone(), self.running_var.clone()
        alpha, beta = self.alpha, self.beta
        dev = mu_i - mu_e
        return mu_e + alpha * dev, beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * dev.square()

    def _evaluate(self, x: Tensor) -> Tensor:
        """Eqs. 5-6 normalization and BN's affine, in float32 or wider (bf16 activations under autocast)."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var_i, mu_i = torch.var_mean(xf, dim=(2, 3), correction=0)
        mu_hat, var_hat = self._estimate(mu_i, var_i)
        scale = torch.rsqrt(var_hat + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mu_hat * scale + (self.bias if self.affine else 0)
        return (xf * scale[..., None, None] + shift[..., None, None]).to(x.dtype)


class _Clamp01(torch.autograd.Function):
    """clamp(raw, 0, 1), whose gradient outside [0, 1] passes only when a descent step moves raw back in.

    A plain clamp has no gradient outside: a value pushed past a bound by a noisy step (or momentum) would
    stay there for good, although the loss asks for it back.
    """

    @staticmethod
    def forward(ctx, raw: Tensor) -> Tensor:
        ctx.save_for_backward(raw)
        return raw.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (raw,) = ctx.saved_tensors
        return grad * (((raw >= 0) | (grad < 0)) & ((raw <= 1) | (grad > 0)))


class _L1ToTarget(torch.autograd.Function):
    """mean |(x - mu) * r - target| over all elements, with gradients for the (N, C) mu and r only.

    A mean, not eq. 9's sum, so the loss scale (and alpha/beta's step size) does not depend on the input
    size. Backward needs only two (N, C) sums, where autograd would keep two activation-sized tensors per
    layer: small batches are usually forced by memory, so the estimator should not cost activations.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mu: Tensor, r: Tensor) -> Tensor:
        centred = x - mu[..., None, None]
        diff = centred * r[..., None, None] - target
        sign = diff.sign()
        ctx.save_for_backward(sign.sum((2, 3)), (sign * centred).sum((2, 3)), r)
        ctx.numel = x.numel()
        return diff.abs().mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor, Tensor]:
        sign_sum, sign_centred_sum, r = ctx.saved_tensors
        g = grad / ctx.numel
        return None, None, -g * r * sign_sum, g * sign_centred_sum


def evalnorm_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the EvalNorm auxiliary losses of the model's last forward (None if none was computed).

    Add it to the task loss each step: its gradient reaches only alpha/beta, so every other gradient stays
    bit-identical. Each layer's loss depends on its own alpha/beta alone, so summing does not rescale them.
    """
    losses = [m.aux_loss for m in model.modules() if isinstance(m, EvalNorm2d) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def evalnorm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The raw alpha/beta parameters of the learnable EvalNorm2d layers (for their own optimizer group)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, EvalNorm2d) and not m.rule
        for p in (m.raw_alpha, m.raw_beta)
    ]


def calibrate(
    model: nn.Module, batches: Iterable[Tensor], *, steps: int, lr: float = 0.1
) -> dict[str, tuple[float, float]]:
    """Offline estimation: fit alpha/beta of every learnable EvalNorm2d layer by minimizing the aux loss on
    `steps` training batches; returns {layer name: (alpha, beta)}.

    `batches` are model inputs on the model's device, of the training batch size: the estimate matches the
    batch statistics of the batches it sees. A re-iterable (list, DataLoader) is gone through again when
    shorter than `steps`; a one-shot iterator must yield `steps` batches. Nothing else changes: every other
    parameter (value, grad, requires_grad), every buffer and each module's train/eval mode are as before.

    Adam, because the aux-loss gradient scale differs by orders of magnitude across layers (it grows with
    how far sample statistics stray from the running ones) and its per-parameter normalization lets one
    `lr` serve all; the lr decays linearly to 0 so the estimate settles instead of jittering with the batch.
    """
    if steps < 1:
        raise ValueError(f"calibrate needs steps >= 1, got {steps}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, EvalNorm2d) and not m.rule}
    if not layers:
        return {}
    params = evalnorm_parameters(model)
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    modes = {m: m.training for m in model.modules()}
    # Train-mode BN forwards update running stats (and train_batch_size): every buffer is put back after
    # each forward, so the EMA statistics the loss compares with stay the trained model's throughout.
    buffers = [(b, b.clone()) for b in model.buffers()]
    optimizer = torch.optim.Adam(params, lr=lr)
    done = 0
    try:
        for p in others:  # no graph through the network: the stop-gradients leave the aux loss none to use
            p.requires_grad_(False)
        model.train()
        for batch in itertools.islice(_repeat(batches), steps):
            optimizer.param_groups[0]["lr"] = lr * (1 - done / steps)
            model(batch)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            optimizer.zero_grad(set_to_none=True)
            evalnorm_aux_loss(model).backward()
            optimizer.step()
            done += 1
    finally:
        for p in others:
            p.requires_grad_(True)
        for m, training in modes.items():
            m.train(training)
        for m in layers.values():
            m.aux_loss = m.raw_alpha.grad = m.raw_beta.grad = None
    if done < steps:
        raise ValueError(f"batches ran out after {done} of {steps} steps; pass a list, a DataLoader or more")
    return {name: (m.alpha.item(), m.beta.item()) for name, m in layers.items()}


def _repeat(batches: Iterable[Tensor]) -> Iterator[Tensor]:
    """`batches` again and again, re-iterating rather than caching them (itertools.cycle would keep every
    batch of the first pass in memory); stops when a pass yields nothing."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return
