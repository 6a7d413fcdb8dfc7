"""The spec's `search.scheduler` as a Tune scheduler that stops DDP trials cleanly.

Tune's schedulers (ASHA, the median stopping rule) decide; `GracefulStop` turns each of their STOP
decisions into a stop request the trial's ranks act on together (execution/stop_requests.py), and tells
Tune to let the trial go on until it ends by itself, a step later: every rank ends cleanly, the trial's
checkpoints are kept, and its MLflow run is ended with who stopped it and at which epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

from orchestrator.execution.stop_requests import ask_to_stop
from orchestrator.spec import SCHEDULER_METRICS, SearchSpec, SpecError, Trial

log = logging.getLogger(__name__)

TIME_ATTR = "epoch"  # every Tune result of a trial is an epoch's end (execution/tune_report.py)


def make_scheduler(search: SearchSpec, trials: list[Trial], sweep: str) -> TrialScheduler | None:
    """The scheduler of `search` for `trials`, or None (`none`: Tune's FIFO, every trial to its end);
    `sweep`: the Tune experiment's path, which names its stop requests."""
    if search.scheduler == "none":
        return None
    epochs = max(t.spec.train.epochs for t in trials)
    if search.grace_epochs >= epochs:
        raise SpecError([
            f"search.grace_epochs: {search.grace_epochs} leaves the {search.scheduler} scheduler nothing to "
            f"stop: the longest trial has {epochs} epochs; allowed: 1 to {epochs - 1}"
        ])  # fmt: skip
    if search.scheduler == "asha":
        inner = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=epochs,
            grace_period=search.grace_epochs,
            reduction_factor=search.reduction_factor,
        )
    else:
        inner = MedianStoppingRule(
            time_attr=TIME_ATTR, grace_period=search.grace_epochs, min_samples_required=search.min_samples
        )
    return GracefulStop(inner, search.scheduler, partial(ask_to_stop, sweep))


def tune_mode(search: SearchSpec) -> str:
    return SCHEDULER_METRICS[search.metric]


class GracefulStop(TrialScheduler):
    """`inner`'s decisions, its STOPs made stop requests (the trial goes on until its ranks end together).
    A trial asked to stop is out of `inner`'s accounting from then on: the epochs it still reports, or its
    end, would stand at rungs it was stopped before."""

    def __init__(self, inner: TrialScheduler, name: str, ask: Callable[[str, str], None]) -> None:
        """ask(trial key, reason): asks the trial's ranks to stop (Tune pickles it with the scheduler)."""
        super().__init__()
        self._inner, self._name, self._ask = inner, name, ask
        self._asked: set[str] = set()  # Tune's trial ids

    @property
    def metric(self) -> str | None:
        return self._inner.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self._inner.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self._inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        if trial.trial_id in self._asked:
            self._inner.on_trial_remove(tune_controller, trial)
        else:
            self._inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if trial.trial_id in self._asked:
            return TrialScheduler.CONTINUE
        decision = self._inner.on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        ours: Trial = trial.config["trial"]
        epoch = int(result[TIME_ATTR])
        if epoch >= ours.spec.train.epochs:
            return TrialScheduler.CONTINUE  # its last epoch: it ends, finished, by itself
        self._asked.add(trial.trial_id)
        metric = self._inner.metric
        reason = f"stopped by {self._name} after epoch {epoch} ({metric} {result[metric]:.4f})"
        log.info("%s: %s", ours.key, reason)
        self._ask(ours.key, reason)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict[str, Any]) -> None:
        if trial.trial_id in self._asked:
            self._inner.on_trial_remove(tune_controller, trial)
        else:
            self._inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        return self._inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return self._inner.debug_string()
