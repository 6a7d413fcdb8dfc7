"""Norm grammar, group counts, GroupNorm vs the paper's definition, SyncBN vs BatchNorm on the whole batch."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.models import norms
from orchestrator.models.catalog import NormSpec, parse_norm
from orchestrator.models.norms import SyncBatchNorm, make_norm


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bn", NormSpec("bn")),
        ("syncbn", NormSpec("syncbn")),
        ("gn:g32", NormSpec("gn", groups=32)),
        ("gn:g1", NormSpec("gn", groups=1)),
        ("gn:c16", NormSpec("gn", channels_per_group=16)),
    ],
)
def test_parse_norm_accepts_the_grammar(text: str, expected: NormSpec) -> None:
    assert parse_norm(text) == expected
    assert str(parse_norm(text)) == text


@pytest.mark.parametrize(
    "text",
    ["gn:x3", "gn", "gn:", "gn:g0", "gn:g-2", "gn:g032", "gn:c", "gn:g3.5", "bn:g4", "BN", " bn", "ln", ""],
)
def test_parse_norm_rejects_with_the_value_and_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="unknown norm") as err:
        parse_norm(text)
    assert repr(text) in str(err.value)
    assert "gn:c<N>" in str(err.value)


def test_catalog_does_not_import_torch() -> None:
    code = "import sys, orchestrator.models.catalog; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize(
    ("spec", "channels", "groups"),
    [
        ("gn:g32", 64, 32),
        ("gn:g32", 48, 16),  # the DeepLabv3+ decoder's 48-channel projection
        ("gn:g32", 728, 8),  # Xception's 728 channels
        ("gn:g8", 3, 1),
        ("gn:c16", 64, 4),
        ("gn:c16", 48, 3),
        ("gn:c16", 728, 91),  # gcd(16, 728) = 8 channels per group
        ("gn:c16", 8, 1),
    ],
)
def test_group_counts(spec: str, channels: int, groups: int) -> None:
    layer = make_norm(spec, channels)
    assert isinstance(layer, nn.GroupNorm)
    assert (layer.num_groups, layer.num_channels) == (groups, channels)


def test_group_fallback_is_logged_once_per_spec_and_channels(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(norms, "_logged_fallbacks", set())
    with caplog.at_level(logging.INFO, logger=norms.__name__):
        for _ in range(3):
            make_norm("gn:g32", 48)
        make_norm("gn:g32", 64)  # divides: nothing to say
        make_norm("gn:c16", 40)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gn:g32" in messages[0] and "48" in messages[0] and "16 groups" in messages[0]
    assert "gn:c16" in messages[1] and "5 groups of 8" in messages[1]


def test_make_norm_kinds() -> None:
    assert type(make_norm("bn", 8)) is nn.BatchNorm2d
    assert type(make_norm(NormSpec("syncbn"), 8)) is SyncBatchNorm


def paper_group_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float = 1e-5
):
    """Figure 3 of Wu & He, Group Normalization (2018), in float64."""
    n, c, h, w = x.shape
    xg = x.double().reshape(n, groups, c // groups * h * w)
    mean = xg.mean(dim=2, keepdim=True)
    var = xg.var(dim=2, unbiased=False, keepdim=True)
    xg = (xg - mean) / torch.sqrt(var + eps)
    return xg.reshape(n, c, h, w) * gamma.double().reshape(1, c, 1, 1) + beta.double().reshape(1, c, 1, 1)


@pytest.mark.parametrize(
    ("spec", "channels", "groups"), [("gn:g4", 16, 4), ("gn:c2", 16, 8), ("gn:g8", 12, 4)]
)
def test_group_norm_matches_the_paper(spec: str, channels: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = make_norm(spec, channels)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(channels, generator=gen))
        layer.bias.copy_(torch.randn(channels, generator=gen))
    x = torch.randn(3, channels, 5, 7, generator=gen) * 2 + 3
    expected = paper_group_norm(x, layer.weight.detach(), layer.bias.detach(), groups)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


# --- SyncBatchNorm ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncCase:
    sizes: tuple[int, ...]  # rows of the batch on each rank
    momentum: float | None
    steps: int
    seed: int = 0

    def rows(self, rank: int) -> slice:
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


# Unequal per-rank batches, and momentum None (BatchNorm's cumulative average) over two steps.
SYNC_CASES = [SyncCase((1, 3), 0.1, 1), SyncCase((2, 2), None, 2, seed=1), SyncCase((3, 2), 0.3, 2, seed=2)]


def _train(layer: nn.Module, case: SyncCase, rows: slice) -> list[torch.Tensor]:
    """`case.steps` forward/backward steps of `layer` on `rows` of the case's batch.

    Returns the last y and dx (of those rows), the accumulated weight/bias grads, and the running stats.
    """
    gen = torch.Generator().manual_seed(case.seed)
    shape = (sum(case.sizes), 3, 4, 5)
    x_all = torch.randn(shape, generator=gen) * 3 + 5  # an offset mean: E[x^2] - E[x]^2 must hold up
    dy_all = torch.randn(shape, generator=gen)
    layer.momentum = case.momentum
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, generator=gen))
        layer.bias.copy_(torch.randn(3, generator=gen))
    for _ in range(case.steps):
        x = x_all[rows].clone().requires_grad_()
        y = layer(x)
        (y * dy_all[rows]).sum().backward()
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]


def _assert_like_batch_norm_on_the_whole_batch(case: SyncCase, per_rank: list[list], tol: float) -> None:
    y, dx, dw, db, mean, var = _train(nn.BatchNorm2d(3), case, slice(None))
    close = {"atol": tol, "rtol": tol}
    torch.testing.assert_close(torch.cat([r[0] for r in per_rank]), y, **close)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]), dx, **close)
    # Each rank holds its rows' share of the parameter grads; DDP adds them up (as a mean).
    torch.testing.assert_close(sum(r[2] for r in per_rank), dw, **close)
    torch.testing.assert_close(sum(r[3] for r in per_rank), db, **close)
    for r in per_rank:  # every rank's running stats are those of the whole batch
        torch.testing.assert_close(r[4], mean, **close)
        torch.testing.assert_close(r[5], var, **close)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_without_a_process_group_is_exactly_batch_norm(momentum: float | None) -> None:
    case = SyncCase((4,), momentum, steps=2)
    _assert_like_batch_norm_on_the_whole_batch(case, [_train(make_norm("syncbn", 3), case, slice(None))], 0)


def test_sync_bn_with_one_rank_is_exactly_batch_norm(tmp_path: Path) -> None:
    # torch's own SyncBatchNorm raises on CPU here ("expected input tensor to be on GPU").
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        case = SyncCase((4,), 0.1, 2)
        _assert_like_batch_norm_on_the_whole_batch(
            case, [_train(make_norm("syncbn", 3), case, slice(None))], 0
        )
    finally:
        dist.destroy_process_group()


def test_ddp_accepts_a_cpu_model_with_sync_bn(tmp_path: Path) -> None:
    # DDP refuses any nn.SyncBatchNorm (subclasses too) inside a CPU module; ours must not be one.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), make_norm("syncbn", 4))
        nn.parallel.DistributedDataParallel(model)(torch.randn(2, 3, 4, 4)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_sync_bn_in_eval_uses_running_stats() -> None:
    layer = make_norm("syncbn", 3).eval()
    mean, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    x = torch.randn(1, 3, 2, 2)
    expected = (x - mean.reshape(1, 3, 1, 1)) / torch.sqrt(var.reshape(1, 3, 1, 1) + layer.eps)
    torch.testing.assert_close(layer(x), expected)


def _sync_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        results = [_train(make_norm("syncbn", 3), case, case.rows(rank)) for case in SYNC_CASES]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_bn_over_two_gloo_processes_is_batch_norm_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for i, case in enumerate(SYNC_CASES):
        _assert_like_batch_norm_on_the_whole_batch(case, [r[i] for r in results], 1e-5)
