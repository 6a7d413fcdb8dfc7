"""The few collective operations the training loop needs; each is a no-op in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if world_size() > 1:
        dist.all_reduce(t, op=op)


def broadcast_buffers(net: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics). DDP broadcasts them at the start of
    each training forward, after which every rank updates its own copy: without this, each rank would
    evaluate a slightly different model than the one rank 0 checkpoints."""
    if world_size() > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (what is checkpointed and evaluated)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
