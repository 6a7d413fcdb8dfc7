"""What a training step costs, counted rather than timed, torch only: the FLOPs of its convolutions and
matrix products and the bytes autograd keeps for the backward (the GPUs that run it: gpus.py).
`orchestrator plan` and bench/gpu.py count with it; on the meta device no memory is touched."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.torch_private import storage_id

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
class StepCost:
    activation_bytes: int  # what autograd keeps for the backward: distinct storages, parameters left out
    flops: int  # forward + backward
    parameters: int  # elements


def step_cost(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, flops: bool = True) -> StepCost:
    """Run a training forward (cross-entropy loss) and, with `flops`, backward of `model` on a batch, on the
    device they are on (meta: shapes only), counting the storages autograd saves and the FLOPs (0 without)."""
    parameters = {storage_id(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if storage_id(t) not in parameters:  # a view of a kept storage counts once: its storage
            saved[storage_id(t)] = t.untyped_storage().nbytes()
        return t

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = nn.functional.cross_entropy(model(images), masks, ignore_index=255)
        if flops:
            loss.backward()

    counted = count_flops(step) if flops else step()
    return StepCost(sum(saved.values()), counted or 0, sum(p.numel() for p in model.parameters()))


def weight_bytes(cost: StepCost, optimizer_states: int, amp: bool) -> int:
    """fp32 weights, gradients and `optimizer_states` copies (SGD with momentum 1, AdamW 2), and autocast's
    bf16 weight copies under `amp`."""
    return cost.parameters * (4 * (2 + optimizer_states) + (2 if amp else 0))


def activation_bytes(one: StepCost, two: StepCost, batch: int) -> int:
    """What autograd keeps at `batch`, from the counts at batch 1 and 2: the activations are affine in the
    batch (per-image tensors plus per-channel statistics)."""
    return one.activation_bytes + (batch - 1) * (two.activation_bytes - one.activation_bytes)


def tensor_bytes(one: StepCost, two: StepCost, batch: int, optimizer_states: int, amp: bool) -> int:
    """Bytes of the tensors a training worker holds at its peak: `weight_bytes` and `activation_bytes`.
    Temporaries of the backward are not counted."""
    return weight_bytes(one, optimizer_states, amp) + activation_bytes(one, two, batch)


def largest_batch(one: StepCost, two: StepCost, memory: float, optimizer_states: int, amp: bool) -> int:
    """The largest batch whose `worker_memory` is at most `memory` bytes; 0 when not even 1 fits."""
    at_one = worker_memory(one, two, 1, optimizer_states, amp)
    per_image = worker_memory(one, two, 2, optimizer_states, amp) - at_one
    batch = max(0, 1 + math.floor((memory - at_one) / per_image))
    while batch and worker_memory(one, two, batch, optimizer_states, amp) > memory:  # float rounding
        batch -= 1
    return batch


def worker_memory(one: StepCost, two: StepCost, batch: int, optimizer_states: int, amp: bool) -> float:
    """`tensor_bytes` with the allowance: activations x FRAGMENTATION, plus CONTEXT_GIB."""
    activations = activation_bytes(one, two, batch) * FRAGMENTATION
    return weight_bytes(one, optimizer_states, amp) + activations + CONTEXT_GIB * GIB
