"""A trial resumed from a mid-epoch checkpoint goes on exactly where it stood: same weights, optimizer, fp16
loss scale and RNG draws (mixup) as a run never stopped."""

from __future__ import annotations

import io
import math

import pytest
import torch

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.train.loop import Best, Position, Worker, make_optimizer, restore, resume_state, train_epoch

CPU = torch.device("cpu")


class Died(Exception):
    """The worker's death, right after its checkpoint was written."""


def _run(spec: specs.Spec, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = model_for(spec)
    # A scale that moves every step (up, or down on an overflow), so that a scaler not restored shows.
    return model, make_optimizer(spec.train, model), torch.amp.GradScaler("cpu", growth_interval=1)


def test_a_run_resumed_mid_epoch_ends_bit_identical_to_one_never_stopped(tiny_shards) -> None:
    raw = {
        "name": "resume",
        "data": {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 2, "batch_per_gpu": 2, "crop": [32, 32], "amp": "fp16", "mixup_alpha": 0.4,
                  "checkpoint_every": 1, "seed": 0},
    }  # fmt: skip
    spec = specs.validate(raw)
    w = Worker(spec)

    model, optimizer, scaler = _run(spec, seed=0)
    for epoch in range(2):
        train_epoch(w, model, optimizer, Position(epoch=epoch), scaler=scaler)

    dying, dying_optimizer, dying_scaler = _run(spec, seed=0)
    written = io.BytesIO()

    def save(position: Position) -> None:  # the first mid-epoch checkpoint, through a file, then death
        state = resume_state(dying_optimizer, dying_scaler, position, Best(-math.inf, 0), CPU)
        torch.save({"model": dying.state_dict(), **state}, written)
        raise Died

    with pytest.raises(Died):
        train_epoch(w, dying, dying_optimizer, Position(), save, dying_scaler)

    resumed, resumed_optimizer, resumed_scaler = _run(spec, seed=1)  # a new process: other weights, other RNG
    written.seek(0)
    state = torch.load(written, weights_only=True)
    position, _ = restore(state, resumed, resumed_optimizer, resumed_scaler, CPU)
    assert (position.epoch, position.step) == (0, 1)
    train_epoch(w, resumed, resumed_optimizer, position, scaler=resumed_scaler)
    train_epoch(w, resumed, resumed_optimizer, Position(epoch=1), scaler=resumed_scaler)

    fresh = torch.amp.GradScaler("cpu", growth_interval=1).state_dict()
    assert state["scaler"] != fresh  # the scale had moved: a scaler not restored would show
    assert resumed_scaler.state_dict() == scaler.state_dict()
    expected = model.state_dict()
    assert [k for k, v in resumed.state_dict().items() if not torch.equal(v, expected[k])] == []
