"""Learning-rate (and momentum) schedules as closed forms of the global optimizer step.

A schedule is a pure function of (step, total): no scheduler object and no state, so a trial resumed
mid-epoch sets exactly the values the uninterrupted run would have set. `step` is the 0-based index of
the optimizer step about to be taken, `total` the run's number of optimizer steps.

- poly: the DeepLab schedule, `(1 - t)^power` of the base LR, optionally after a linear warmup.
- one_cycle: Smith's one-cycle policy as `torch.optim.lr_scheduler.OneCycleLR` computes it (two phases):
  the LR rises from max/div_factor to max over the first `pct_start` of the run, then falls to
  max/(div_factor*final_div_factor); momentum (AdamW: beta1) moves the opposite way between
  max_momentum and base_momentum.

The math and `apply` are torch-free (spec.py may import the names); `build_optimizer` imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

SCHEDULES = ("poly", "one_cycle")
OPTIMIZERS = ("sgd", "adamw")
ADAMW_BETA2 = 0.999


def _check_step(step: int, total: int) -> None:
    if total < 1 or not 0 <= step < total:
        raise ValueError(f"step {step} is outside a run of {total} optimizer steps (0 <= step < total)")


def poly(step: int, total: int, warmup: int = 0, power: float = 0.9) -> float:
    """Factor of the base LR: `(step + 1) / warmup` over the first `warmup` steps, then
    `(1 - (step - warmup) / (total - warmup)) ** power`; 1 at the warmup's end, `(1/(total-warmup))**power`
    at the last step. With `warmup=0` this is `(1 - step/total) ** power`."""
    _check_step(step, total)
    if warmup < 0 or (warmup and warmup >= total):
        raise ValueError(
            f"warmup of {warmup} steps does not fit a run of {total} optimizer steps: "
            "lower train.warmup_steps below epochs x steps per epoch"
        )
    if step < warmup:
        return (step + 1) / warmup
    return (1 - (step - warmup) / (total - warmup)) ** power


def _anneal(start: float, end: float, pct: float, anneal: str) -> float:
    if anneal == "cos":
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
    return start + (end - start) * pct


def one_cycle(
    step: int,
    total: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: Literal["cos", "linear"] = "cos",
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[float, float]:
    """(factor of the max LR, momentum) at `step`, as OneCycleLR has them after `step` scheduler steps.

    Phase 1 ends at step `pct_start * total - 1`: LR 1/div_factor -> 1, momentum max -> base.
    Phase 2 ends at the last step `total - 1`: LR 1 -> 1/(div_factor * final_div_factor), momentum
    base -> max. A phase too short to hold a step counts as finished (OneCycleLR divides by zero)."""
    _check_step(step, total)
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear', not {anneal!r}")
    initial = 1 / div_factor
    phases = (  # (end step, start lr, end lr, start momentum, end momentum)
        (pct_start * total - 1, initial, 1.0, max_momentum, base_momentum),
        (total - 1, 1.0, initial / final_div_factor, base_momentum, max_momentum),
    )
    start_step = 0.0
    for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            span = end_step - start_step
            pct = (step - start_step) / span if span > 0 else 1.0
            return _anneal(lr0, lr1, pct, anneal), _anneal(m0, m1, pct, anneal)
        start_step = end_step
    raise AssertionError("unreachable: the last phase always matches")


@dataclass(frozen=True)
class Schedule:
    """A schedule's settings; `name` is `train.lr_schedule`, `warmup` is `train.warmup_steps` (poly only).
    Under one_cycle the base LR passed to `apply` is the cycle's peak and the optimizer's momentum (AdamW:
    beta1) is overwritten every step with a value in `momentum = (base, max)`."""

    name: Literal["poly", "one_cycle"] = "poly"
    warmup: int = 0
    power: float = 0.9
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: Literal["cos", "linear"] = "cos"
    momentum: tuple[float, float] = (0.85, 0.95)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, not {self.name!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, not {self.warmup}")
        if self.warmup and self.name != "poly":
            raise ValueError(
                "train.warmup_steps applies to the poly schedule; one_cycle warms up over its first pct_start"
            )
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must lie in (0, 1), not {self.pct_start}")
        if self.div_factor <= 0 or self.final_div_factor <= 0 or self.power <= 0:
            raise ValueError("power, div_factor and final_div_factor must be positive")
        if self.anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be 'cos' or 'linear', not {self.anneal!r}")
        base, peak = self.momentum
        if not 0 <= base <= peak < 1:
            raise ValueError(f"momentum (base, max) needs 0 <= base <= max < 1, not {self.momentum}")

    def at(self, step: int, total: int) -> tuple[float, float | None]:
        """(factor of the base LR, momentum or None where the schedule leaves momentum alone)."""
        if self.name == "poly":
            return poly(step, total, self.warmup, self.power), None
        return one_cycle(
            step, total, self.pct_start, self.div_factor, self.final_div_factor, self.anneal, *self.momentum
        )


def apply(optimizer: Any, step: int, total: int, schedule: Schedule, base_lr: float) -> float:
    """Set every param group's lr to `base_lr * group["lr_mult"] * factor` for optimizer step `step` of
    `total`, and, where the schedule cycles momentum, SGD's `momentum` or AdamW's `betas[0]`. Returns the
    factor. `optimizer` is anything with torch's `param_groups` (a list of dicts)."""
    factor, momentum = schedule.at(step, total)
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0) * factor
        if momentum is None:
            continue
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        else:
            group["momentum"] = momentum
    return factor


def build_optimizer(
    name: Literal["sgd", "adamw"],
    groups: list[dict[str, Any]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> Any:
    """`train.optimizer` over `groups` (keys a group sets, such as `weight_decay`, win over the defaults):
    sgd is SGD with heavy-ball momentum (no Nesterov); adamw is AdamW with betas (momentum, 0.999) and
    decoupled weight decay, so `train.weight_decay` means a different strength under each."""
    import torch  # here, not at the top: the schedules themselves must stay importable without torch

    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, ADAMW_BETA2), weight_decay=weight_decay)
    raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
