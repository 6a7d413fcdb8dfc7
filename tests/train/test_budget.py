"""train.budget: a number of optimizer steps or training images held equal over a grid, spread over the
epochs, whose batches run on through passes over the split where the last epoch's ended."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.train.loop import Position, make_optimizer, train_epoch
from tests.tiny_worker import tiny_worker

MINIMAL = {"name": "b", "data": {"train": "/d/train", "val": "/d/val"}}


def trainer(**train) -> specs.TrainSpec:
    return specs.validate({**MINIMAL, "train": train}).train


@pytest.mark.parametrize(("total", "epochs"), [(10, 4), (1024, 4), (7, 7), (5, 3)])
def test_a_steps_budget_is_spread_over_the_epochs_evenly_to_one_step(total: int, epochs: int) -> None:
    steps = trainer(epochs=epochs, budget=f"steps:{total}").budget_steps(workers=2)
    assert sum(steps) == total and len(steps) == epochs
    assert max(steps) - min(steps) <= 1


def test_an_images_budget_is_the_steps_that_train_those_images() -> None:
    # 3 x 2 x 4 = 24 images a step: 2400 images are 100 steps at every batch of the grid alike.
    t = trainer(epochs=4, budget="images:2400", batch_per_gpu=2, accumulate=3)
    assert t.budget_steps(workers=4) == [25] * 4
    assert trainer(epochs=4).budget_steps(workers=4) is None  # epochs: the data decides


def test_budget_epochs_takes_a_pass_per_epoch_and_steps_hold_the_steps_at_every_batch(tiny_shards) -> None:
    for batch, passes in ((1, 8), (2, 4), (4, 2)):  # 8 scenes, 1 worker: a pass is 8 / batch steps
        assert tiny_worker(tiny_shards, "e", epochs=2, batch_per_gpu=batch).epoch_steps == [passes] * 2
        held = tiny_worker(tiny_shards, "s", epochs=2, batch_per_gpu=batch, budget="steps:10")
        assert held.epoch_steps == [5, 5] and held.images_trained(2) == 10 * batch


def _masks(batches, count: int) -> list[torch.Tensor]:
    it = iter(batches)
    return [next(it)[1] for _ in range(count)]


def test_budgeted_epochs_take_up_the_passes_where_the_last_epoch_ended(tiny_shards: Path) -> None:
    """3 steps of batch 2 an epoch over passes of 4 batches: epoch 1 is the last batch of pass 0 and the
    first two of pass 1, shuffled as pass 1; a resume at step 1 of it starts at pass 1's first batch."""
    w = tiny_worker(tiny_shards, "p", epochs=3, batch_per_gpu=2, budget="steps:9", crop=[32, 32])
    passes = [m for index in range(3) for m in _masks(w.loader(train=True, epoch=index), 4)]
    assert not all(torch.equal(a, b) for a, b in zip(passes[:4], passes[4:8], strict=True))  # reshuffled
    stream = [m for epoch in range(3) for m in _masks(w.train_batches(Position(epoch)), 3)]
    assert all(torch.equal(a, b) for a, b in zip(stream, passes[:9], strict=True))
    resumed = _masks(w.train_batches(Position(epoch=1, step=1)), 2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, passes[4:6], strict=True))


def test_a_steps_budget_runs_the_lr_schedule_over_its_steps(tiny_shards: Path) -> None:
    """5 steps over 2 epochs (2 + 3, passes of 2 steps): the poly LR of the last is (1 - 4/5)^0.9 of the
    base, the images trained are the steps' images."""
    w = tiny_worker(tiny_shards, "lr", epochs=2, batch_per_gpu=4, budget="steps:5", crop=[32, 32], lr=0.01)
    torch.manual_seed(0)
    model = model_for(w.spec)
    optimizer = make_optimizer(w.spec.train, model)
    trained = [train_epoch(w, model, optimizer, Position(epoch)) for epoch in range(2)]
    assert w.epoch_steps == [2, 3] and w.images_trained(2) == 5 * 4
    assert trained[-1]["lr"] == pytest.approx(0.01 * (1 - 4 / 5) ** 0.9)
    assert all(r["skipped_samples"] == 0 for r in trained)
