"""The training loop's collectives and accumulation across 2 real gloo processes."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator import metrics
from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.train.distributed import all_reduce, average_buffers, distribute, unwrap
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch, validate
from orchestrator.train.step import accumulate_gradients


def tiny_segmenter(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(4, 3, 1))


def micro_batches(seed: int, k: int, b: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        masks = torch.randint(0, 3, (b, 6, 6), generator=g)
        masks[:, :, : int(torch.randint(0, 4, (), generator=g))] = 255  # padded crops: uneven valid pixels
        out.append((torch.randn(b, 3, 6, 6, generator=g), masks))
    return out


def _buffers_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = distribute(tiny_segmenter(nn.BatchNorm2d(4)), torch.device("cpu"))
        torch.manual_seed(1 + rank)  # each rank sees its own data, as under DDP
        model(torch.randn(2, 3, 5, 5) * (rank + 1)).sum().backward()
        net = unwrap(model)
        before = [b.clone() for b in net.buffers()]
        average_buffers(net)
        total = torch.tensor([rank + 1.0])
        all_reduce(total)
        torch.save({"before": before, "after": list(net.buffers()), "total": total}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_average_buffers_gives_every_rank_the_mean_bn_statistics(tmp_path: Path) -> None:
    mp.spawn(_buffers_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    mean0, var0, count0 = r0["before"]
    mean1, var1, count1 = r1["before"]
    assert not torch.equal(mean0, mean1)  # each rank kept its own running statistics
    torch.testing.assert_close(r0["after"][0], (mean0 + mean1) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(r0["after"][1], (var0 + var1) / 2, rtol=0, atol=1e-7)
    for a, b in zip(r0["after"], r1["after"], strict=True):
        assert torch.equal(a, b)
    assert r0["after"][2] == count0 == count1
    assert r0["total"].item() == r1["total"].item() == 3.0


def test_single_process_collectives_are_no_ops() -> None:
    net = nn.BatchNorm2d(2)
    t = torch.tensor([2.0])
    all_reduce(t)
    average_buffers(net)
    assert t.item() == 2.0 and unwrap(net) is net


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulating_micro_batches_gives_the_gradient_of_their_union_for_gn() -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(nn.GroupNorm(2, 4))
    micro = micro_batches(seed=3, k=3)
    loss_k = accumulate_gradients(model, micro, torch.device("cpu"), "off")
    accumulated = grads(model)
    model.zero_grad()
    union = [(torch.cat([x for x, _ in micro]), torch.cat([m for _, m in micro]))]
    loss_1 = accumulate_gradients(model, union, torch.device("cpu"), "off")
    for a, b in zip(accumulated, grads(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_k, loss_1, rtol=1e-6, atol=0)


def test_bn_normalizes_each_micro_batch_on_its_own() -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(nn.BatchNorm2d(4))
    micro = micro_batches(seed=3, k=2, b=2)
    accumulate_gradients(model, micro, torch.device("cpu"), "off")
    accumulated = grads(model)
    model.zero_grad()
    union = [(torch.cat([x for x, _ in micro]), torch.cat([m for _, m in micro]))]
    accumulate_gradients(model, union, torch.device("cpu"), "off")
    assert not torch.allclose(accumulated[0], grads(model)[0], rtol=1e-3)  # the norm batch is the micro-batch


def _accumulate_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(tiny_segmenter(nn.GroupNorm(2, 4)))
        accumulate_gradients(model, micro_batches(seed=10 + rank, k=3), torch.device("cpu"), "off")
        torch.save(grads(model), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_accumulation_averages_every_micro_batch_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_accumulate_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    per_rank = []
    for rank in range(2):  # the same accumulation in one process, without DDP
        torch.manual_seed(0)
        model = tiny_segmenter(nn.GroupNorm(2, 4))
        accumulate_gradients(model, micro_batches(seed=10 + rank, k=3), torch.device("cpu"), "off")
        per_rank.append(grads(model))
    expected = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _per_gpu_bn_worker(rank: int, store: str, shards: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        spec = specs.validate({
            "name": "per-gpu-bn", "model": {"backbone": "resnet18"}, "norm": "bn",
            "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 0},
            "train": {"epochs": 1, "batch_per_gpu": 2, "crop": [32, 32]},
        })  # fmt: skip
        w = Worker(spec, rank=rank, world=2)
        torch.manual_seed(spec.train.seed)  # as train_loop_per_worker does
        model = distribute(model_for(spec), w.device)
        net = unwrap(model)
        bn = net.backbone.bn1
        means = []  # the per-channel mean of each batch this rank's first BN normalized
        bn.register_forward_pre_hook(lambda m, args: means.append(args[0].detach().mean((0, 2, 3))))
        train_epoch(w, model, make_optimizer(spec.train, net), Position())
        before = bn.running_mean.clone()
        average_buffers(net)
        torch.save({"means": means, "before": before, "after": bn.running_mean}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_per_gpu_bn_ranks_keep_their_own_statistics_through_the_loop_until_averaged(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """The training loop's DDP, an epoch of the real loop on each rank's own images: each rank's running
    mean is the running average of its own batches alone (DDP's default would copy rank 0's into the
    others before every forward), different between ranks, and their mean after average_buffers."""
    mp.spawn(_per_gpu_bn_worker, args=(str(tmp_path / "store"), str(tiny_shards), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for r in ranks:
        assert len(r["means"]) >= 2
        own = torch.zeros_like(r["before"])
        for mean in r["means"]:  # BatchNorm2d's update, momentum 0.1, from its initial zeros
            own = 0.9 * own + 0.1 * mean
        torch.testing.assert_close(r["before"], own, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ranks[0]["before"], ranks[1]["before"])
    mean = (ranks[0]["before"] + ranks[1]["before"]) / 2
    for r in ranks:
        torch.testing.assert_close(r["after"], mean, rtol=0, atol=1e-7)


def _validation_spec(shards: str) -> specs.Spec:
    return specs.validate({
        "name": "per-image", "model": {"backbone": "resnet18", "head": "fcn"}, "norm": "bn",
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 0},
        "train": {"epochs": 1, "batch_per_gpu": 2, "crop": [32, 32]},
    })  # fmt: skip


def _validate_worker(rank: int, store: str, shards: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        spec = _validation_spec(shards)
        torch.manual_seed(0)
        torch.save(validate(Worker(spec, rank=rank, world=2), model_for(spec)), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_validation_gives_each_images_matrix_in_the_splits_order_on_any_number_of_ranks(
    tmp_path: Path,
) -> None:
    """5 validation images over 2 ranks (3 and 2, batches of 2): every rank gets all 5 matrices, in the
    order one process validates them, and they sum to the matrix the scores come from."""
    from orchestrator.data.shards import pack
    from orchestrator.data.synth import synthesize

    synthesize(str(tmp_path / "raw"), train=4, val=5, size=(64, 36))
    pack(str(tmp_path / "raw"), str(tmp_path / "shards"), shard_size=2, workers=1)
    spec = _validation_spec(str(tmp_path / "shards"))
    torch.manual_seed(0)
    scores, alone = validate(Worker(spec), model_for(spec))
    assert alone.shape == (5, 3, 3) and len({tuple(m.flatten().tolist()) for m in alone}) == 5
    assert metrics.summarize(alone.sum(0))["val_miou"] == scores["val_miou"]
    mp.spawn(
        _validate_worker, args=(str(tmp_path / "store"), str(tmp_path / "shards"), str(tmp_path)), nprocs=2
    )
    for rank in range(2):
        ranked_scores, ranked = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(ranked, alone) and ranked_scores == scores
