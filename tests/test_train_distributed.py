"""The training loop's collectives across 2 real gloo processes."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.train.distributed import all_reduce, broadcast_buffers, unwrap


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        torch.manual_seed(1 + rank)  # each rank sees its own data, as under DDP
        model(torch.randn(2, 3, 5, 5) * (rank + 1)).sum().backward()
        net = unwrap(model)
        before = [b.clone() for b in net.buffers()]
        broadcast_buffers(net)
        total = torch.tensor([rank + 1.0])
        all_reduce(total)
        torch.save({"before": before, "after": list(net.buffers()), "total": total}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_broadcast_buffers_gives_every_rank_rank0s_bn_statistics(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    # DDP broadcast rank 0's buffers before the forward; each rank then updated its own copy.
    assert not torch.equal(r0["before"][0], r1["before"][0])
    for a, b, own in zip(r0["after"], r1["after"], r0["before"], strict=True):
        assert torch.equal(a, b) and torch.equal(a, own)
    assert r0["total"].item() == r1["total"].item() == 3.0


def test_single_process_collectives_are_no_ops() -> None:
    net = nn.BatchNorm2d(2)
    t = torch.tensor([2.0])
    all_reduce(t)
    broadcast_buffers(net)
    assert t.item() == 2.0 and unwrap(net) is net
