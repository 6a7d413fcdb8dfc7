"""The divergence guard (train/divergence.py): a non-finite step changes no weight, K of them in a row end the
trial as diverged; a validation of one class at E epochs in a row after warmup does too. The sweep test of
a diverging trial is in tests/execution/test_trial_faults.py."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_worker import tiny_worker

from orchestrator.checkpoints import model_for
from orchestrator.train import loop
from orchestrator.train.divergence import Diverged, DivergenceGuard, NonFiniteLoss
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch


def test_nonfinite_steps_in_a_row_end_the_trial_and_a_finite_one_resets_the_count() -> None:
    guard = DivergenceGuard(nonfinite_steps=3, single_class_epochs=0)
    losses = [1.0, math.nan, math.inf, 0.9, math.nan, -math.inf]
    assert [guard.step_is_finite(x, 1, i + 1) for i, x in enumerate(losses)] == [1, 0, 0, 1, 0, 0]
    with pytest.raises(Diverged, match=r"^loss nan at 3 steps in a row, the last at epoch 2 step 1$"):
        guard.step_is_finite(math.nan, 2, 1)


def test_with_the_guard_off_the_first_nonfinite_loss_fails_the_trial() -> None:
    guard = DivergenceGuard(nonfinite_steps=0, single_class_epochs=0)
    with pytest.raises(NonFiniteLoss, match=r"^loss nan at epoch 1 step 1$"):
        guard.step_is_finite(math.nan, 1, 1)


def test_single_class_validations_count_only_after_warmup_and_in_a_row() -> None:
    guard = DivergenceGuard(nonfinite_steps=3, single_class_epochs=2, warmup_steps=10)
    guard.validated(1, epoch=1, steps_done=4)  # in warmup: not counted
    guard.validated(1, epoch=2, steps_done=8)
    guard.validated(1, epoch=3, steps_done=12)  # 1
    guard.validated(2, epoch=4, steps_done=16)  # a second class: back to 0
    guard.validated(1, epoch=5, steps_done=20)  # 1
    with pytest.raises(Diverged, match=r"single class .* at 2 epochs in a row, the last epoch 6$"):
        guard.validated(1, epoch=6, steps_done=24)
    DivergenceGuard(3, single_class_epochs=0).validated(1, epoch=9, steps_done=99)  # off


@pytest.fixture
def worker(tiny_shards) -> Worker:
    return tiny_worker(
        tiny_shards, "guard", epochs=1, batch_per_gpu=1, crop=[32, 32], diverge_nonfinite_steps=3
    )


def poisoned(bad_steps: set[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's steps whose 0-based index is in `bad_steps` get a NaN loss and NaN gradients."""
    real, calls = loop.accumulate_gradients, iter(range(1000))

    def accumulate(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        if next(calls) in bad_steps:
            for p in model.parameters():
                p.grad.fill_(math.nan)
            return loss * math.nan
        return loss

    monkeypatch.setattr(loop, "accumulate_gradients", accumulate)


def test_a_nonfinite_step_changes_no_weight_and_training_goes_on(worker, monkeypatch) -> None:
    poisoned({1, 2}, monkeypatch)
    model = model_for(worker.spec)
    report = train_epoch(worker, model, make_optimizer(worker.spec.train, model), Position())
    assert report["nonfinite_steps"] == 2
    assert math.isfinite(report["train_loss"])  # the mean of the finite steps
    assert all(torch.isfinite(p).all() for p in model.parameters())  # a NaN step applied would spread


def test_nonfinite_steps_up_to_the_bound_end_the_trial_as_diverged(worker, monkeypatch) -> None:
    poisoned({1, 2, 3}, monkeypatch)
    model = model_for(worker.spec)
    with pytest.raises(Diverged, match=r"at 3 steps in a row, the last at epoch 1 step 4$"):
        train_epoch(worker, model, make_optimizer(worker.spec.train, model), Position())


def test_validation_counts_the_classes_it_predicted_over_the_whole_split(worker) -> None:
    """The guard's sign, against the predictions counted one image at a time (ignored pixels left out)."""
    model = model_for(worker.spec)
    torch.nn.init.zeros_(model.head.classifier.weight)  # a collapsed model: the bias decides everywhere
    torch.nn.init.constant_(model.head.classifier.bias, 0.0)
    model.head.classifier.bias.data[2] = 1.0
    assert loop.validate(worker, model)[0]["val_predicted_classes"] == 1
    torch.manual_seed(0)
    fresh = model_for(worker.spec).eval()
    predicted = set()
    with torch.no_grad():
        for images, masks in worker.loader(train=False):
            predicted |= set(fresh(images).argmax(1)[masks != 255].tolist())
    assert loop.validate(worker, fresh)[0]["val_predicted_classes"] == len(predicted) > 1
