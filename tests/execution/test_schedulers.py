"""The spec's search.scheduler as Tune schedulers: Tune's decisions, each STOP made a stop request that the
trial's ranks act on together. The sweep test of a trial ASHA stops is in test_trial_faults.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

from orchestrator import spec as specs
from orchestrator.execution.schedulers import GracefulStop, make_scheduler

MINIMAL = {"name": "s", "data": {"train": "x", "val": "y"}, "train": {"epochs": 4}}


def trials(search: dict, **grid) -> tuple[specs.SearchSpec, list[specs.Trial]]:
    spec = specs.validate({**MINIMAL, "search": search, **({"grid": grid} if grid else {})})
    return spec.search, specs.expand(spec)


@dataclass
class TuneTrial:
    """What a scheduler reads of a ray.tune Trial."""

    trial_id: str
    config: dict
    status: str = "RUNNING"
    evaluated_params: dict = field(default_factory=dict)
    placement_group_factory: object = None


def test_none_is_tunes_fifo_and_each_scheduler_gets_the_spec_parameters() -> None:
    assert make_scheduler(*trials({}), "runs/s") is None
    asha = make_scheduler(*trials({"scheduler": "asha", "grace_epochs": 2, "reduction_factor": 3}), "runs/s")
    assert isinstance(asha, GracefulStop) and isinstance(asha._inner, ASHAScheduler)
    assert (asha._inner._max_t, asha._inner._reduction_factor) == (4, 3)
    median = make_scheduler(*trials({"scheduler": "median", "grace_epochs": 2, "min_samples": 5}), "runs/s")
    assert isinstance(median._inner, MedianStoppingRule)
    assert (median._inner._grace_period, median._inner._min_samples_required) == (2, 5)


def test_a_scheduler_with_nothing_to_stop_is_refused_naming_the_field() -> None:
    with pytest.raises(specs.SpecError) as e:
        make_scheduler(*trials({"scheduler": "asha", "grace_epochs": 4}), "runs/s")
    assert str(e.value).startswith("search.grace_epochs: 4 leaves the asha scheduler nothing to stop")


@pytest.mark.parametrize("key", ["search.scheduler", "resources.max_concurrent_trials"])
def test_a_grid_over_a_setting_of_the_whole_sweep_is_refused(key: str) -> None:
    values = {"search.scheduler": ["asha", "none"], "resources.max_concurrent_trials": [1, 2]}[key]
    with pytest.raises(specs.SpecError, match=rf"grid\.{key}: the sweep's, one for all of its trials"):
        specs.validate({**MINIMAL, "grid": {key: values}})


class Inner(TrialScheduler):
    """A scheduler that stops trial "1" at its first result, and records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def on_trial_result(self, tune_controller, trial, result):
        self.calls.append(("result", trial.trial_id, result["epoch"]))
        return TrialScheduler.STOP if trial.trial_id == "1" else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result):
        self.calls.append(("complete", trial.trial_id))

    def on_trial_remove(self, tune_controller, trial):
        self.calls.append(("remove", trial.trial_id))

    @property
    def metric(self):
        return "train_loss"


def test_a_stop_becomes_a_request_and_the_trial_leaves_the_schedulers_accounting() -> None:
    """Tune is told to let a stopped trial go on; its later epochs and its end reach the scheduler no more
    (they would stand at rungs it was stopped before)."""
    points = trials({"scheduler": "asha"}, **{"train.seed": [0, 1]})[1]
    asked, inner = [], Inner()
    scheduler = GracefulStop(inner, "asha", lambda key, reason: asked.append((key, reason)))
    a, b = (TuneTrial(str(i), {"trial": t}) for i, t in enumerate(points))
    assert scheduler.on_trial_result(None, a, {"epoch": 1, "train_loss": 0.5}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, b, {"epoch": 1, "train_loss": 0.9}) == TrialScheduler.CONTINUE
    assert asked == [("train.seed=1", "stopped by asha after epoch 1 (train_loss 0.9000)")]
    # Its next epoch, reported before its ranks saw the request, and its end.
    assert scheduler.on_trial_result(None, b, {"epoch": 2, "train_loss": 0.1}) == TrialScheduler.CONTINUE
    scheduler.on_trial_complete(None, b, {"epoch": 2, "train_loss": 0.1})
    scheduler.on_trial_complete(None, a, {"epoch": 4, "train_loss": 0.2})
    assert inner.calls == [("result", "0", 1), ("result", "1", 1), ("remove", "1"), ("complete", "0")]
    assert len(asked) == 1


def test_a_trial_at_its_last_epoch_is_never_asked_to_stop() -> None:
    """Tune's ASHA stops every trial that reaches max_t: that trial ends, finished, by itself."""
    search, points = trials({"scheduler": "asha", "metric": "train_loss"})
    asked = []
    scheduler = make_scheduler(search, points, "runs/s")
    scheduler._ask = lambda key, reason: asked.append(key)
    scheduler.set_search_properties("train_loss", "min")
    (trial,) = (TuneTrial("0", {"trial": t}) for t in points)
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"epoch": 4, "train_loss": 0.5}) == TrialScheduler.CONTINUE
    assert asked == []
