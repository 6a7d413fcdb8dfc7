"""What a training step costs, counted rather than timed, torch only: the FLOPs of its convolutions and
matrix products and the bytes autograd keeps for the backward (the GPUs that run it: gpus.py).
`orchestrator plan` and bench/gpu.py count with it; on the meta device no memory is touched."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.torch_private import map_tensors, storage_id, tensors_in

GIB = 1 << 30
FRAGMENTATION = 1.10  # the caching allocator's blocks beyond what the activations hold (uncalibrated)
CONTEXT_GIB = 1.0  # CUDA context and library workspaces, per GPU


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products that fn runs (forward and, if it runs one, backward)."""
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}
    ) as c:
        fn()
    return c.get_total_flops()


def conv_backward_flops(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups,
    output_mask, **kwargs
) -> int:  # fmt: skip
    """A convolution's input gradient and weight gradient each cost its forward's FLOPs.

    torch's own formula (2.13) leaves the groups out of the weight gradient, counting a depthwise convolution
    `groups` times over: DeepLabv3+'s separable ASPP (2048 groups) would dominate the count and the MFU."""
    spatial = (x_shape if transposed else grad_out_shape)[2:]  # where the filter is applied
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)  # w_shape holds channels / groups
    return forward * (int(output_mask[0]) + int(output_mask[1]))


@dataclass(frozen=True)
class AutocastPolicy:
    """The calls torch.autocast runs in its low-precision dtype, in float32, or in their widest input type,
    named as a TorchFunctionMode sees them (F.interpolate, not aten::upsample_bilinear2d); any other call runs
    in its inputs' dtype. From the AMP docs' Autocast Op Reference and torch's autocast kernels
    (tests/test_compute.py checks each name that is an aten op against the dispatcher)."""

    lower: frozenset[str]
    fp32: frozenset[str]
    promote: frozenset[str]


def _words(*texts: str) -> frozenset[str]:
    return frozenset(word for text in texts for word in text.split())


_MATMULS = (
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear matmul __matmul__ mm bmm "
    "addmm addbmm baddbmm prelu"
)
_LOSSES = (
    "cross_entropy nll_loss poisson_nll_loss cosine_embedding_loss hinge_embedding_loss kl_div l1_loss "
    "smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss "
    "triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits cdist prod"
)
CUDA_AUTOCAST = AutocastPolicy(  # what training runs under on a GPU (train.amp)
    lower=_words(_MATMULS, "addmv addr mv chain_matmul"),
    fp32=_words(
        _LOSSES,
        "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__ __rpow__ "
        "__rdiv__ __rtruediv__ softplus layer_norm group_norm cosine_similarity dist pdist renorm logsumexp "
        "interpolate softmax log_softmax cumprod cumsum sum norm normalize",
    ),
    promote=_words("addcdiv addcmul atan2 bilinear cross dot grid_sample index_put scatter_add tensordot"),
)
CPU_AUTOCAST = AutocastPolicy(  # the CPU's: the tests check the emulation against a real autocast with it
    lower=_words(_MATMULS),
    fp32=_words(_LOSSES, "grid_sample max_unpool2d max_unpool3d max_pool3d avg_pool3d"),
    promote=_words("cat stack index_copy"),
)


class Autocast(TorchFunctionMode):
    """torch.autocast's casts under `policy`, for tensors of any device: autocast acts on CUDA and CPU
    tensors alone, and `orchestrator plan` runs on meta tensors what a GPU runs under autocast. Floating
    inputs (not float64) are cast with autograd, as autocast casts them, so the casts a backward needs are
    saved; a weight's low-precision copy is made once per context, as autocast caches it."""

    def __init__(self, policy: AutocastPolicy, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.policy, self.dtype = policy, dtype
        self._weights: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if kwargs.get("dtype") is not None:  # an explicit dtype is not autocast's to change
            return func(*args, **kwargs)
        if name in self.policy.lower:
            to = self.dtype
        elif name in self.policy.fp32:
            to = torch.float32
        elif name in self.policy.promote:
            floats = [t.dtype for t in tensors_in((args, kwargs)) if t.dtype in (torch.float32, self.dtype)]
            to = max(floats, key=lambda d: d.itemsize, default=None)
        else:
            return func(*args, **kwargs)
        args, kwargs = map_tensors(lambda t: self._cast(t, to), (args, kwargs))
        return func(*args, **kwargs)

    def _cast(self, t: torch.Tensor, to: torch.dtype | None) -> torch.Tensor:
        if to is None or t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or t.dtype == to:
            return t
        if to != self.dtype or not (t.is_leaf and t.requires_grad):
            return t.to(to)
        return self._weights.setdefault(id(t), t.to(to))


@dataclass(frozen=True)
class StepCost:
    activation_bytes: int  # what autograd keeps for the backward: distinct storages, parameters left out
    flops: int  # forward + backward
    parameters: int  # elements


def step_cost(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    flops: bool = True,
    autocast: AutocastPolicy | None = None,
) -> StepCost:
    """Run a training forward (cross-entropy loss; under `autocast` to bfloat16 if given: fp16's bytes are the
    same) and, with `flops`, backward of `model` on a batch, on the device they are on (meta: shapes only),
    counting the storages autograd saves (autocast's casts among them) and the FLOPs (0 without)."""
    parameters = {storage_id(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if storage_id(t) not in parameters:  # a view of a kept storage counts once: its storage
            saved[storage_id(t)] = t.untyped_storage().nbytes()
        return t

    def step() -> None:
        casts = Autocast(autocast) if autocast else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), casts:
            loss = nn.functional.cross_entropy(model(images), masks, ignore_index=255)
        if flops:
            loss.backward()

    counted = count_flops(step) if flops else step()
    return StepCost(sum(saved.values()), counted or 0, sum(p.numel() for p in model.parameters()))


def weight_bytes(cost: StepCost, optimizer_states: int) -> int:
    """fp32 weights, gradients and `optimizer_states` copies (SGD with momentum 1, AdamW 2). Autocast's
    low-precision weight copies are among the activations: the convolutions save them."""
    return cost.parameters * 4 * (2 + optimizer_states)


def activation_bytes(one: StepCost, two: StepCost, batch: int) -> int:
    """What autograd keeps at `batch`, from the counts at batch 1 and 2: the activations are affine in the
    batch (per-image tensors plus per-channel statistics)."""
    return one.activation_bytes + (batch - 1) * (two.activation_bytes - one.activation_bytes)


def tensor_bytes(one: StepCost, two: StepCost, batch: int, optimizer_states: int) -> int:
    """Bytes of the tensors a training worker holds at its peak: `weight_bytes` and `activation_bytes`.
    Temporaries of the backward are not counted."""
    return weight_bytes(one, optimizer_states) + activation_bytes(one, two, batch)


def largest_batch(one: StepCost, two: StepCost, memory: float, optimizer_states: int) -> int:
    """The largest batch whose `worker_memory` is at most `memory` bytes; 0 when not even 1 fits."""
    at_one = worker_memory(one, two, 1, optimizer_states)
    per_image = worker_memory(one, two, 2, optimizer_states) - at_one
    batch = max(0, 1 + math.floor((memory - at_one) / per_image))
    while batch and worker_memory(one, two, batch, optimizer_states) > memory:  # float rounding
        batch -= 1
    return batch


def worker_memory(
    one: StepCost, two: StepCost, batch: int, optimizer_states: int, cuda: bool = True
) -> float:
    """`tensor_bytes` with the allowance: activations x FRAGMENTATION, plus CONTEXT_GIB on a GPU."""
    activations = activation_bytes(one, two, batch) * FRAGMENTATION
    return weight_bytes(one, optimizer_states) + activations + CONTEXT_GIB * GIB * cuda
