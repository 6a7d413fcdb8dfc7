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


def average_buffers(net: nn.Module) -> None:
    """Average floating buffers (BN running statistics) over ranks; other buffers (batch counters)
    take rank 0's value.

    Per-GPU BN normalizes each rank's batch with that batch's statistics, and each rank keeps its own
    running estimate (DDP runs with broadcast_buffers=False). Averaging them before evaluation and
    checkpointing estimates the population statistics from every rank's data, where DDP's default
    (rank 0's buffers copied to all at each forward) would use a 1/world share of it. For `syncbn`
    the ranks' statistics are already equal; GN has no buffers."""
    if world_size() == 1:
        return
    for buffer in net.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world_size())
        else:
            dist.broadcast(buffer, src=0)


def count_distinct(value: str) -> int:
    """How many different values the ranks hold (e.g. node ids: the nodes a trial runs on)."""
    if world_size() == 1:
        return 1
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return len(set(values))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (what is checkpointed and evaluated)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
