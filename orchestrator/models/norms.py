"""Every normalization layer: a spec string (see `catalog.parse_norm`) -> an nn.Module for C channels.

Models never pick a norm or an activation class themselves: they call `make_norm(spec, C)` for each norm,
`make_act(spec, C, act)` for each activation (a norm may own the activations: FRN's TLU), or `norm_act` for
the pair.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from orchestrator.models.catalog import NORMS, NormSpec, parse_norm

logger = logging.getLogger(__name__)

# (spec, C) pairs whose group count was adjusted and already logged: one line per layer shape, not per layer.
_logged_fallbacks: set[tuple[str, int]] = set()


def make_norm(spec: str | NormSpec, num_channels: int, *, instance_half: bool = False) -> nn.Module:
    """The norm layer for `num_channels` channels described by `spec` (a string or a parsed NormSpec): its
    row's class (catalog.NORMS), built by its `from_spec`.

    `instance_half` marks the layers where IBN-Net-a mixes in instance norm (the model decides where): for
    `ibn-a` / `ign-a:*` those get an IBN layer, the others plain BN / GN. Other specs ignore it.
    """
    spec = parse_norm(spec)
    if NORMS[spec.kind].mixes_instance and not instance_half:
        return make_norm(IBN.rest(spec), num_channels)
    return layer_class(spec.kind).from_spec(spec, num_channels)


# The activations a model asks `make_act` for, by name; each built for its C channels, in place or not.
ACTIVATIONS: dict[str, Callable[[int, bool], nn.Module]] = {
    "relu": lambda channels, inplace: nn.ReLU(inplace),
    "leaky_relu": lambda channels, inplace: nn.LeakyReLU(0.01, inplace),  # in-place ABN's slope
    "prelu": lambda channels, inplace: nn.PReLU(channels),  # one slope per channel
}


def make_act(
    spec: str | NormSpec, num_channels: int, act: str = "relu", *, inplace: bool = True
) -> nn.Module:
    """The activation a model with norm `spec` has where it places activation `act` (ACTIVATIONS), on
    `num_channels` channels: `act` itself, unless the norm owns the model's activations (its row's
    `activation`, FRN's TLU). Models call it for every activation, after a norm or not; `inplace=False`
    where the input is read again (a pre-activation whose input is also the shortcut)."""
    owned = NORMS[parse_norm(spec).kind].activation
    return _imported(owned)(num_channels) if owned else ACTIVATIONS[act](num_channels, inplace)


def norm_act(
    spec: str | NormSpec, num_channels: int, act: str = "relu", *, instance_half: bool = False
) -> tuple[nn.Module, nn.Module]:
    """(norm, activation) for a norm an activation follows: `make_norm` and `make_act`, two modules so
    that each keeps the name a checkpoint gives it (`bn1`; a ReLU holds no tensors)."""
    return make_norm(spec, num_channels, instance_half=instance_half), make_act(spec, num_channels, act)


def layer_class(kind: str) -> type[nn.Module]:
    """The class that builds norm `kind`: its row's dotted path (catalog.NORMS), imported."""
    return _imported(NORMS[kind].layer)


def _imported(path: str) -> type[nn.Module]:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def norm_layers() -> tuple[type[nn.Module], ...]:
    """Every class of layer make_norm builds, which convert_norms replaces: the rows' classes, and torch's
    BatchNorm2d (torchvision's models) and SyncBatchNorm (what syncbn builds on CUDA)."""
    return (nn.BatchNorm2d, nn.SyncBatchNorm, *{layer_class(kind) for kind in NORMS})


def group_count(spec: NormSpec, num_channels: int) -> int:
    """Groups for a grouped norm: N for `g<N>`, C / N for `c<N>`, or the nearest grouping that divides C.

    When N does not divide C (GroupNorm(32) on the 48-channel decoder projection), both use gcd(N, C), the
    largest number dividing both: `g<N>` takes gcd(N, C) groups, `c<N>` groups of gcd(N, C) channels.
    """
    if spec.groups is not None:
        groups = math.gcd(spec.groups, num_channels)
        exact = groups == spec.groups
    else:
        per_group = math.gcd(spec.channels_per_group, num_channels)
        groups, exact = num_channels // per_group, per_group == spec.channels_per_group
    if not exact and (str(spec), num_channels) not in _logged_fallbacks:
        _logged_fallbacks.add((str(spec), num_channels))
        logger.warning(
            "norm %s does not divide %d channels; using %d groups of %d channels",
            spec,
            num_channels,
            groups,
            num_channels // groups,
        )
    return groups


def convert_norms(model: nn.Module, spec: str | NormSpec) -> nn.Module:
    """Replace every norm layer of a built model (in place) by `make_norm(spec, C)`; returns the model.

    Affine weights and running stats are copied where both layers have them: BN -> frozenbn freezes a
    trained model's statistics for fine-tuning, BN -> evalnorm keeps everything, BN -> GN keeps the affine.
    Specs that change more than the norms are refused: IBN-a's placement (the first norm of the blocks in
    layer1-3) is the architecture's, `+ws` changes the convs, and a norm that owns the activations (FRN's
    TLU) changes those, to or from it; build the model with those instead.
    """
    spec = parse_norm(spec)
    row = NORMS[spec.kind]
    owned = tuple({_imported(n.activation) for n in NORMS.values() if n.activation})
    why = (
        "+ws changes its convs"
        if spec.ws
        else "where IBN-a mixes in instance norm is architecture"
        if row.mixes_instance
        else "it owns the model's activations"
        if row.activation
        else "the model's norm owns its activations"
        if any(isinstance(m, owned) for m in model.modules())
        else ""
    )
    if why:
        raise ValueError(f"cannot convert a model's norms to {str(spec)!r} ({why}); build the model with it")
    layers = norm_layers()

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, layers):
                setattr(module, name, _converted(child, spec))
            else:
                swap(child)

    swap(model)
    return model


def _converted(old: nn.Module, spec: NormSpec) -> nn.Module:
    """`make_norm(spec, C)` for the C channels of norm layer `old`, with the tensors the two share."""
    if isinstance(old, IBN):  # its halves' affines make one per-channel affine; IN has no running stats
        channels = old.num_channels
        state = {k: torch.cat([old.IN.state_dict()[k], old.BN.state_dict()[k]]) for k in ("weight", "bias")}
    else:
        channels = old.num_channels if isinstance(old, nn.GroupNorm) else old.num_features
        state = old.state_dict()
    new = make_norm(spec, channels)
    own = new.state_dict().keys()
    new.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    reference = next(t for t in state.values() if t.is_floating_point())
    return new.to(reference.device, reference.dtype).train(old.training)


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class BatchNorm2d(nn.BatchNorm2d):
    """torch's BatchNorm2d: statistics of each GPU's batch."""

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        return cls(num_channels)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics span all ranks of the process group, for CPU workers (gloo).

    Same parameters and buffers as BatchNorm2d and nn.SyncBatchNorm, so checkpoints move between them.
    Without a group (or with one rank) and in eval it is exactly BatchNorm2d.
    """

    def __init__(self, num_features: int, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        # torch's on CUDA (nccl). It refuses CPU tensors, and DDP refuses any nn.SyncBatchNorm (subclasses
        # too) inside a CPU module, so CPU workers (Ray hides the GPUs from them) get this gloo version.
        return nn.SyncBatchNorm(num_channels) if torch.cuda.is_available() else cls(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _world_size(self.process_group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        xhat = _SyncNormalize.apply(
            x, self.running_mean, self.running_var, momentum, self.eps, self.process_group
        )
        if not self.affine:
            return xhat
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return xhat * self.weight.reshape(shape) + self.bias.reshape(shape)


class _SyncNormalize(torch.autograd.Function):
    """xhat = (x - mean) / sqrt(var + eps) with mean/var over every rank's batch.

    Forward all-reduces [sum x, sum x^2, count] per channel; backward all-reduces [sum g, sum g*xhat], so the
    result equals BatchNorm on the concatenated batch for any per-rank batch sizes (a rank may even hold 0).
    Sums accumulate in float64 (var = E[x^2] - E[x]^2 cancels badly in float32); bf16/fp16 inputs are
    normalized in float32.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, momentum, eps, group):
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.tensor([xf.numel() / channels], dtype=torch.float64)
        stats = torch.cat(
            [xf.sum(dims, dtype=torch.float64), xf.square().sum(dims, dtype=torch.float64), count]
        )
        dist.all_reduce(stats, group=group)
        total, total_sq = stats[:-1].split(channels)
        n = stats[-1].item()
        if n <= 1:
            raise ValueError(f"SyncBatchNorm needs more than 1 value per channel over all ranks, got {n:.0f}")
        mean = total / n
        var = (total_sq / n - mean.square()).clamp_(min=0)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)  # unbiased, global n
        shape = (1, channels) + (1,) * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps).to(xf.dtype).reshape(shape)
        xhat = (xf - mean.to(xf.dtype).reshape(shape)) * invstd
        ctx.save_for_backward(xhat, invstd)
        ctx.n, ctx.group = n, group
        return xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xhat, invstd = ctx.saved_tensors
        channels, dims = xhat.shape[1], [0, *range(2, xhat.dim())]
        g = grad.to(xhat.dtype)
        sums = torch.cat([g.sum(dims, dtype=torch.float64), (g * xhat).sum(dims, dtype=torch.float64)])
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_gx = (s.div(ctx.n).to(g.dtype).reshape(invstd.shape) for s in sums.split(channels))
        grad_x = (g - mean_g - xhat * mean_gx) * invstd
        return grad_x.to(grad.dtype), None, None, None, None, None


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine: y = x * scale + shift, the same in train and eval.

    All four tensors are buffers (nothing trains) named as BatchNorm2d's, so a BN state_dict loads; its
    `num_batches_tracked` is dropped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        return cls(num_channels)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class IBN(nn.Module):
    """IBN-Net-a's mixed norm (Pan et al., ECCV 2018): instance norm on the first floor(C/2) channels,
    `rest` (BN for ibn-a, GN for ign-a) on the others.

    The children are named `IN` and `BN` (even when `BN` is a GroupNorm), as in IBN-Net's checkpoints.
    """

    def __init__(self, num_channels: int, rest: NormSpec) -> None:
        super().__init__()
        self.num_channels, self.half = num_channels, num_channels // 2
        self.IN = make_norm(NormSpec("in"), self.half)
        self.BN = make_norm(rest, num_channels - self.half)

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        return cls(num_channels, cls.rest(spec))

    @staticmethod
    def rest(spec: NormSpec) -> NormSpec:
        """The norm of the channels outside the instance-norm half: BN for ibn-a, GN for ign-a:*."""
        return replace(spec, kind={"ibn-a": "bn", "ign-a": "gn"}[spec.kind])

    def forward(self, x: Tensor) -> Tensor:
        first, rest = x.split((self.half, self.num_channels - self.half), dim=1)
        return keep_layout(x, torch.cat([self.IN(first), self.BN(rest)], dim=1))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose output keeps its input's memory layout."""

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        return cls(group_count(spec, num_channels), num_channels)

    def forward(self, x: Tensor) -> Tensor:
        return keep_layout(x, super().forward(x))


class InstanceNorm(GroupNorm):
    """One channel per group: per sample and channel over (H, W) with a per-channel affine, exactly
    InstanceNorm2d(C, affine=True) (which keeps no running stats either), with GN's key names."""

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        return cls(num_channels, num_channels)


class LayerNorm(GroupNorm):
    """One group: per sample over (C, H, W), with a per-channel affine."""

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> nn.Module:
        return cls(1, num_channels)


def keep_layout(x: Tensor, out: Tensor) -> Tensor:
    """`out` in `x`'s channels_last layout where `x` has it and `out` lost it. GroupNorm has returned a
    channels-first tensor for a channels_last input on CUDA in some torch versions, and a concatenation of
    channel slices can too; the next convolution would then convert every activation back."""
    last = torch.channels_last
    if x.dim() == 4 and x.is_contiguous(memory_format=last) and not out.is_contiguous(memory_format=last):
        return out.contiguous(memory_format=last)
    return out
