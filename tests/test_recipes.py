"""Training recipes in the loop itself: mixed precision, and seeded runs that are bit-identical."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestrator import spec as specs
from orchestrator.train.checkpoint import model_for
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch


def worker(shards: Path, **train) -> Worker:
    raw = {
        "name": "recipes",
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 2},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 1, "batch_per_gpu": 2, "crop": [32, 32], "lr": 0.01, **train},
    }
    return Worker(specs.validate(raw))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_without_nan_and_keeps_norm_statistics_in_fp32(
    tiny_shards: Path, amp: str
) -> None:
    w = worker(tiny_shards, amp=amp)
    model = model_for(w.spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = train_epoch(w, model, make_optimizer(w.spec, model), Position(), w.steps_per_epoch())
    assert math.isfinite(report["train_loss"])
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # fp32 weights and BN statistics
    assert not torch.equal(state["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_two_runs_with_one_seed_end_bit_identical_and_another_seed_does_not(tiny_shards: Path) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        w = worker(tiny_shards, seed=seed, epochs=2)
        torch.manual_seed(w.spec.train.seed)  # as train_loop_per_worker does
        model = model_for(w.spec)
        optimizer = make_optimizer(w.spec, model)
        for epoch in range(2):
            train_epoch(w, model, optimizer, Position(epoch=epoch), w.steps_per_epoch())
        return model.state_dict()

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
