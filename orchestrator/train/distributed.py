"""The few collective operations the training loop needs; each is a no-op in a single process."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# Each rank keeps its own BN running statistics (no buffer broadcast at each forward). torch 2.13 renamed
# broadcast_buffers to forward_sync_buffers and warns on the old name; older torch has only the old one.
_RANK_LOCAL_BUFFERS = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if world_size() > 1:
        dist.all_reduce(t, op=op)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` [n, ...] in rank order, on every rank; n may differ between ranks."""
    if world_size() == 1:
        return t
    counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([t.shape[0]], device=t.device))
    padded = t.new_zeros(int(max(counts)), *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(count)] for part, count in zip(parts, counts, strict=True)])


def distribute(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on its device, in DDP when more than one rank runs: gradients are all-reduced, while BN
    running statistics stay each rank's own until average_buffers (per-GPU BN)."""
    model = model.to(device)
    if world_size() == 1:
        return model
    ids = [device] if device.type == "cuda" else None  # CPU modules take none
    return DDP(model, device_ids=ids, output_device=device if ids else None, **_RANK_LOCAL_BUFFERS)


def average_buffers(net: nn.Module) -> None:
    """Average floating buffers (BN running statistics) over ranks; other buffers (batch counters)
    take rank 0's value.

    Per-GPU BN normalizes each rank's batch with that batch's statistics, and each rank keeps its own
    running estimate (see distribute). Averaging them before evaluation and
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
