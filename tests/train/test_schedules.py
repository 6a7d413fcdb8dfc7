"""LR schedules: poly with warmup and one-cycle against their closed forms and against torch's OneCycleLR."""

import math
from pathlib import Path

import pytest
import torch

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.train import schedules
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch
from orchestrator.train.schedules import Schedule, apply, build_optimizer, one_cycle, poly


def groups(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[dict]]:
    """A backbone weight at lr_mult 1 (decayed), a head weight at 10 (not decayed), as make_optimizer has."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(4, 3, generator=g)),
        torch.nn.Parameter(torch.randn(3, generator=g)),
    ]
    return params, [
        {"params": [params[0]], "lr_mult": 1.0},
        {"params": [params[1]], "lr_mult": 10.0, "weight_decay": 0.0},
    ]


def momentum_of(group: dict) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


def loss(params: list[torch.nn.Parameter]) -> torch.Tensor:
    x = torch.arange(12.0).reshape(3, 4) / 12
    return ((x @ params[0]).sin() @ params[1]).square().sum()


# poly


def test_poly_closed_form_with_warmup():
    total, warmup = 110, 10
    assert poly(0, total, warmup) == pytest.approx(0.1)
    assert poly(4, total, warmup) == pytest.approx(0.5)
    assert poly(9, total, warmup) == 1.0  # warmup ends at the base LR ...
    assert poly(10, total, warmup) == 1.0  # ... where the decay starts
    assert poly(60, total, warmup) == pytest.approx(0.5**0.9)  # halfway through the decay
    assert poly(109, total, warmup) == pytest.approx(0.01**0.9)  # last step: 1/(total - warmup) left
    assert poly(60, total, warmup, power=2.0) == pytest.approx(0.25)


def test_poly_without_warmup_is_the_loops_formula():
    total = 57
    for step in range(total):
        assert poly(step, total) == pytest.approx((1 - step / total) ** 0.9, rel=1e-15)


def test_poly_rises_through_warmup_then_falls():
    f = [poly(s, 200, warmup=20) for s in range(200)]
    assert all(a < b for a, b in zip(f[:19], f[1:20], strict=True))  # strictly up to 1 at step 19
    assert f[19] == f[20] == 1.0
    assert all(a > b for a, b in zip(f[20:], f[21:], strict=False))  # strictly down after
    assert 0 < f[-1] < 0.01


@pytest.mark.parametrize(("step", "total", "warmup"), [(-1, 10, 0), (10, 10, 0), (0, 10, 10), (0, 10, -1)])
def test_poly_rejects_steps_outside_the_run_and_oversized_warmup(step, total, warmup):
    with pytest.raises(ValueError, match="step|warmup"):
        poly(step, total, warmup)


# one-cycle


def test_one_cycle_closed_form():
    # total 80, pct_start 0.25: phase 1 is steps 0..19, phase 2 steps 19..79 (60 steps, middle at 49).
    total, div, final = 80, 25.0, 1e4
    lr, m = one_cycle(0, total, 0.25, div, final)
    assert (lr, m) == (pytest.approx(1 / div), pytest.approx(0.95))
    lr, m = one_cycle(5, total, 0.25, div, final)
    cos = (1 + math.cos(math.pi * 5 / 19)) / 2  # cosine weight of the start value
    assert lr == pytest.approx(1 + (1 / div - 1) * cos) and m == pytest.approx(0.85 + 0.1 * cos)
    assert one_cycle(19, total, 0.25, div, final) == (pytest.approx(1.0), pytest.approx(0.85))  # the peak
    lr, m = one_cycle(49, total, 0.25, div, final)
    assert lr == pytest.approx((1 + 1 / (div * final)) / 2) and m == pytest.approx(0.9)
    lr, m = one_cycle(79, total, 0.25, div, final)
    assert lr == pytest.approx(1 / (div * final)) and m == pytest.approx(0.95)  # last step: the floor


def test_one_cycle_linear_closed_form():
    total = 80  # same phases as above; linear: halfway in phase 1 at step 9.5, in phase 2 at step 49
    lr, m = one_cycle(49, total, 0.25, 10.0, 100.0, anneal="linear")
    assert lr == pytest.approx((1 + 1e-3) / 2) and m == pytest.approx(0.9)
    lr, m = one_cycle(10, total, 0.25, 10.0, 100.0, anneal="linear")
    assert lr == pytest.approx(0.1 + 0.9 * 10 / 19) and m == pytest.approx(0.95 - 0.1 * 10 / 19)


def test_one_cycle_lr_up_then_down_momentum_the_opposite_way():
    total = 100
    values = [one_cycle(s, total) for s in range(total)]
    lrs, moms = [v[0] for v in values], [v[1] for v in values]
    peak = lrs.index(max(lrs))
    assert peak == 29  # pct_start 0.3: phase 1 ends at step 0.3 * 100 - 1
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert moms.index(min(moms)) == peak
    assert all(a > b for a, b in zip(moms[:peak], moms[1 : peak + 1], strict=True))
    assert all(a < b for a, b in zip(moms[peak:], moms[peak + 1 :], strict=False))


def test_one_cycle_degenerate_runs_do_not_divide_by_zero():
    assert one_cycle(0, 1) == (pytest.approx(1 / 25e4), pytest.approx(0.95))  # one step: the floor
    assert one_cycle(0, 2, pct_start=0.5)[0] == pytest.approx(1.0)  # a one-step phase 1 is at its end


# the reference: torch's OneCycleLR over a whole run


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize(("total", "pct_start", "anneal"), [(60, 0.3, "cos"), (37, 0.25, "linear")])
def test_one_cycle_matches_torch_onecyclelr(name, total, pct_start, anneal):
    base_lr = 0.02
    schedule = Schedule(
        "one_cycle",
        pct_start=pct_start,
        div_factor=20.0,
        final_div_factor=50.0,
        anneal=anneal,
        momentum=(0.8, 0.99),
    )
    ours_params, ours_groups = groups()
    ours = build_optimizer(name, ours_groups, lr=base_lr, momentum=0.9, weight_decay=1e-3)
    ref_params, ref_groups = groups()
    ref = build_optimizer(name, ref_groups, lr=base_lr, momentum=0.9, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        ref,
        max_lr=[base_lr * g["lr_mult"] for g in ref.param_groups],
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy=anneal,
        div_factor=20.0,
        final_div_factor=50.0,
        base_momentum=0.8,
        max_momentum=0.99,
    )
    for step in range(total):
        apply(ours, step, total, schedule, base_lr)
        for a, b in zip(ours.param_groups, ref.param_groups, strict=True):
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=1e-15), step
            assert momentum_of(a) == pytest.approx(momentum_of(b), rel=1e-12), step
        for optimizer, params in ((ours, ours_params), (ref, ref_params)):
            optimizer.zero_grad()
            loss(params).backward()
            optimizer.step()
        scheduler.step()
    # The same hyperparameters at every step leave the same weights.
    for a, b in zip(ours_params, ref_params, strict=True):
        torch.testing.assert_close(a, b)
    assert ours_params[0].detach().ne(groups()[0][0]).any()  # the run did move the weights


# applying to an optimizer


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("schedule", [Schedule("poly", warmup=5), Schedule("one_cycle")])
def test_head_groups_keep_their_multiplier(name, schedule):
    _, param_groups = groups()
    optimizer = build_optimizer(name, param_groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    total = 50
    for step in range(total):
        factor = apply(optimizer, step, total, schedule, 0.01)
        backbone, head = optimizer.param_groups
        assert backbone["lr"] == pytest.approx(0.01 * factor)
        assert head["lr"] == pytest.approx(10 * backbone["lr"])
        assert momentum_of(backbone) == momentum_of(head)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_poly_leaves_momentum_alone_one_cycle_sets_it(name):
    _, param_groups = groups()
    optimizer = build_optimizer(name, param_groups, lr=0.01, momentum=0.7, weight_decay=1e-4)
    apply(optimizer, 3, 10, Schedule("poly", warmup=2), 0.01)
    assert [momentum_of(g) for g in optimizer.param_groups] == [0.7, 0.7]
    apply(optimizer, 0, 10, Schedule("one_cycle"), 0.01)
    assert [momentum_of(g) for g in optimizer.param_groups] == [pytest.approx(0.95)] * 2
    if name == "adamw":
        assert [g["betas"][1] for g in optimizer.param_groups] == [schedules.ADAMW_BETA2] * 2


def test_build_optimizer_kinds_and_settings():
    _, param_groups = groups()
    sgd = build_optimizer("sgd", param_groups, lr=0.02, momentum=0.9, weight_decay=5e-4)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is False
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4, 0.0]  # a group's own value wins
    assert [g["lr_mult"] for g in sgd.param_groups] == [1.0, 10.0]
    _, param_groups = groups()
    adamw = build_optimizer("adamw", param_groups, lr=1e-3, momentum=0.9, weight_decay=0.05)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer("adam", groups()[1], lr=1e-3, momentum=0.9, weight_decay=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cosine"}, "lr_schedule"),
        ({"name": "one_cycle", "warmup": 10}, "warmup_steps"),
        ({"warmup": -1}, "warmup"),
        ({"pct_start": 1.0}, "pct_start"),
        ({"momentum": (0.95, 0.85)}, "momentum"),
        ({"anneal": "exp"}, "anneal"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


@pytest.mark.parametrize(("name", "optimizer"), [("one_cycle", "adamw"), ("poly", "sgd")])
def test_the_training_loop_follows_the_spec_schedule_and_optimizer(
    tiny_shards: Path, name: str, optimizer: str
) -> None:
    raw = {
        "name": "sched",
        "data": {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 2, "batch_per_gpu": 2, "crop": [32, 32], "lr": 0.05, "lr_schedule": name,
                  "optimizer": optimizer, "warmup_steps": 2 if name == "poly" else 0},
    }  # fmt: skip
    spec = specs.validate(raw)
    w = Worker(spec)
    model = model_for(spec)
    opt = make_optimizer(spec.train, model)
    assert type(opt).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
    last = train_epoch(w, model, opt, Position(epoch=1))["lr"]  # the run's last step
    steps = sum(w.epoch_steps)
    factor, _ = Schedule(name, warmup=2 if name == "poly" else 0).at(steps - 1, steps)
    assert last == pytest.approx(0.05 * factor, rel=1e-12)
