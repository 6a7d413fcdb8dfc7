"""Ray Tune + Ray Train wiring: one Tune trial per grid point, each a driver function that runs a
Ray Train data-parallel trainer (the Train V2 pattern: `Tuner(TorchTrainer(...))` is not supported).

`orchestrator train` runs the same driver function for a single point without Tune.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from orchestrator import tracking
from orchestrator.data.resample import sample_repeats, split_ids
from orchestrator.data.shards import read_manifest
from orchestrator.errors import UsageError
from orchestrator.spec import (
    ResourcesSpec,
    Spec,
    expand,
    flatten,
    from_flat,
    public_params,
    resolve,
    trial_key,
)
from orchestrator.tune_report import EpochReportCallback

log = logging.getLogger(__name__)

# Environment every Ray process of a sweep gets. OpenMP's default busy-wait made CPU steps 10-25x
# slower on shared cores; Ray Train's 2 s default health-check interval blocks each report ~2 s.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


# A custom resource, one per concurrent trial: what trial drivers hold instead of CPUs.
DRIVER_SLOT = "trial_driver"


@dataclass
class TrialOutcome:
    key: str
    status: str  # FINISHED | FAILED
    metrics: dict[str, float]
    error: str | None = None


def run_sweep(spec: Spec, resume: bool = False, command: str | None = None) -> list[TrialOutcome]:
    """Run every grid point of the spec as a Tune trial; returns one outcome per point.

    resume: restore the spec's Tune experiment (after its driver died): finished trials stay finished,
    the others continue from their last checkpoints, under the same MLflow runs.
    command: the command line, kept as a tag of the sweep run it starts (a resumed run keeps its own)."""
    uri = tracking.tracking_uri()
    experiment_id = tracking.ensure_experiment(spec.experiment, uri)
    tune_path = f"{_storage(spec).rstrip('/')}/{spec.name}"
    _init_ray(spec)
    _check_fits(spec)
    if resume and not tune.Tuner.can_restore(tune_path):
        raise UsageError(f"nothing to resume at {tune_path}: run `orchestrator sweep` without --resume")
    parent = resume and tracking.resume_sweep_run(experiment_id, tune_path, uri)
    if not parent:
        parent = tracking.start_sweep_run(experiment_id, spec.name, _sweep_params(spec), uri, tune_path)
        tracking.tag_command(parent, command, uri)
    trainable = tune.with_parameters(
        _tune_trial, experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri, grid=list(spec.grid)
    )
    trainable = tune.with_resources(trainable, _driver_resources())
    if resume:
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        base = flatten(spec)
        tuner = tune.Tuner(
            trainable,
            param_space={**base, **{k: tune.grid_search(v) for k, v in spec.grid.items()}},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.resources.max_concurrent_trials,
                metric="val_miou",
                mode="max",
                # The next trial's driver runs in the last one's process: no new Python to start and
                # import torch, Ray Train and MLflow into (~4 s of each hand-over on 2 cores).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(name=spec.name, storage_path=_storage(spec), verbose=1),
        )
    results = tuner.fit()
    outcomes = []
    for result in results:
        key = trial_key(result.config, spec.grid)
        error = None if result.error is None else _reason(result.error)
        outcomes.append(
            TrialOutcome(key, "FAILED" if error else "FINISHED", dict(result.metrics or {}), error)
        )
    failed = any(o.status == "FAILED" for o in outcomes)
    tracking.set_tags(parent, {"orchestrator.trials": len(outcomes)}, uri)
    tracking.end_run(parent, uri, failed=failed)
    return outcomes


def run_single(spec: Spec, command: str | None = None) -> TrialOutcome:
    """One trial (the spec's base point, grid ignored) through the same driver, without Tune; `command`
    is tagged on its sweep run."""
    uri = tracking.tracking_uri()
    experiment_id = tracking.ensure_experiment(spec.experiment, uri)
    _init_ray(spec)
    _check_fits(spec.model_copy(update={"grid": {}}))
    parent = tracking.start_sweep_run(experiment_id, spec.name, _sweep_params(spec), uri)
    tracking.tag_command(parent, command, uri)
    config = expand(spec.model_copy(update={"grid": {}}))[0]
    try:
        result = run_trial(config, experiment_id, parent, uri, grid=[], callbacks=[])
    except Exception as e:
        tracking.end_run(parent, uri, failed=True)
        return TrialOutcome("base", "FAILED", {}, _reason(e))
    tracking.end_run(parent, uri)
    return TrialOutcome("base", "FINISHED", result)


def run_trial(
    config: dict[str, Any],
    experiment_id: str,
    parent_run_id: str,
    tracking_uri: str,
    grid: list[str],
    callbacks: list,
    on_finished: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """The driver of one trial: open its MLflow child run, fit a Ray Train trainer, close the run.

    A trial whose run already finished (its driver died after it, before Tune recorded it) is not run
    again: its metrics go to `on_finished` (Tune needs a result) and are returned."""
    config = resolve(config)  # Tune's point holds the unset backbone-dependent defaults as None
    spec = from_flat(config)
    key = trial_key(config, grid)
    done = tracking.find_trial_run(experiment_id, parent_run_id, key, tracking_uri)
    if done and done.info.status == "FINISHED":
        log.info("trial %s finished in an earlier run of this sweep: kept", key)
        if on_finished:
            on_finished(done.data.metrics)
        return dict(done.data.metrics)
    run_id = tracking.start_trial_run(experiment_id, parent_run_id, key, public_params(config), tracking_uri)
    try:
        repeats = _sample_repeats(spec, run_id, tracking_uri)
    except (LookupError, ValueError) as e:
        tracking.end_run(run_id, tracking_uri, failed=True, reason=str(e))
        raise TrialFailed(str(e)) from None
    # Imported here, in the trial's driver: the sweep's own process never starts a Ray Train run.
    from orchestrator.train.launch import Trainer, train_loop_per_worker

    r = spec.resources
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": config,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "repeats": repeats,
        },
        scaling_config=ScalingConfig(
            num_workers=r.workers_per_trial,
            use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": r.cpus_per_worker,
                **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {}),
            },
            placement_strategy=r.placement.upper(),
        ),
        run_config=RunConfig(
            # Stable per grid point, so a restarted driver resumes the same Ray Train run.
            name=f"train-{_digest(parent_run_id, key)}",
            storage_path=_storage(spec),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A dead worker or node restarts the worker group from the last checkpoint.
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.end_run(run_id, tracking_uri, failed=True, reason=_reason(e))
        raise
    reason = tracking.failure(run_id, tracking_uri)  # set by rank 0 for a failure not worth a retry
    tracking.end_run(run_id, tracking_uri, failed=bool(reason))
    if reason:
        raise TrialFailed(reason)
    return dict(result.metrics or {})


def _sample_repeats(spec: Spec, run_id: str, uri: str) -> dict[str, int] | None:
    """train.sample_weights_from as copies per training sample id, resolved once by the trial's driver
    (the workers get the plan, not MLflow access); the counts go to the trial's params."""
    t, d = spec.train, spec.data
    if t.sample_weights_from is None:
        return None
    scores = tracking.per_image_scores(t.sample_weights_from, t.sample_score, uri)
    ids = [i for shard in split_ids(read_manifest(d.train, d.storage_options), d.train) for i in shard]
    repeats = sample_repeats(
        scores, ids, repeat_below=t.repeat_below, repeat_times=t.repeat_times, drop_below=t.drop_below
    )
    counts = list(repeats.values())
    tracking.log_params(
        run_id,
        {
            "resample.scored": len(scores.keys() & set(ids)),
            "resample.repeated": sum(c > 1 for c in counts),
            "resample.dropped": counts.count(0),
            "resample.epoch_samples": len(ids) + sum(c - 1 for c in counts),
        },
        uri,
    )
    return repeats


def _tune_trial(
    config: dict[str, Any], experiment_id: str, parent_run_id: str, tracking_uri: str, grid: list[str]
) -> None:
    run_trial(config, experiment_id, parent_run_id, tracking_uri, grid, [EpochReportCallback()], tune.report)


class TrialFailed(RuntimeError):
    """A trial that ended for a reason of its own (a non-finite loss, out of memory)."""


def _reason(error: BaseException) -> str:
    """The last line of an error: the message, without the tracebacks Ray wraps it in."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _init_ray(spec: Spec) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray.
    address="local" avoids silently joining (or hanging on) a stale `ray start` head."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
    else:
        # Ray Train watches the nodes of each worker group for preemption (spot instances): a Ray this
        # process starts has no node to lose, so that is one actor process fewer to start per trial.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        slots = {DRIVER_SLOT: spec.resources.max_concurrent_trials}
        # The dashboard (and its job API) answers on loopback only; Ray 2.60 adds token auth.
        ray.init(address="local", runtime_env={"env_vars": env}, resources=slots, dashboard_host="127.0.0.1")


def _check_fits(spec: Spec) -> None:
    """A trial that can never be placed would wait forever: on a local Ray, say so and stop; on a cluster
    (whose autoscaler may add nodes), warn. Every grid point is checked (the grid may vary resources)."""
    points = (from_flat(config).resources for config in expand(spec))
    for r in {r.model_dump_json(): r for r in points}.values():
        _check_resources(r)


def _check_resources(r: ResourcesSpec) -> None:
    have = ray.cluster_resources()
    needs = {"CPU": r.workers_per_trial * r.cpus_per_worker, "GPU": r.workers_per_trial * r.gpus_per_worker}
    short = [
        f"{k} {v:g} (the cluster has {have.get(k, 0):g})" for k, v in needs.items() if v > have.get(k, 0)
    ]
    nodes = sum(node["Alive"] for node in ray.nodes())
    if r.placement == "strict_spread" and nodes < r.workers_per_trial:
        short.append(f"{r.workers_per_trial} nodes for placement strict_spread (the cluster has {nodes})")
    if not short:
        return
    problem = f"a trial of {r.workers_per_trial} workers needs " + ", ".join(short)
    if not os.environ.get("RAY_ADDRESS"):
        raise UsageError(
            f"{problem}: lower resources.workers_per_trial, cpus_per_worker or gpus_per_worker, "
            "or run on a cluster"
        )
    log.warning("%s: trials wait until the cluster grows", problem)


def _driver_resources() -> dict[str, float]:
    """What a trial driver holds. Its work is waiting on its workers, so it takes a driver slot and
    no CPU: a driver holding a CPU left 2-core machines with no room for the 2 workers (Ray waits
    forever). Tune refuses an empty request, so clusters without slots give it a sliver of CPU."""
    if ray.cluster_resources().get(DRIVER_SLOT):
        return {"CPU": 0, DRIVER_SLOT: 1}
    return {"CPU": 0.01}


def _storage(spec: Spec) -> str:
    """Ray Train checkpoints and Tune state: the spec's URI, else ./runs (absolute: Ray needs it)."""
    return spec.storage or str(Path("runs").resolve())


def _sweep_params(spec: Spec) -> dict[str, Any]:
    params = {f"grid.{k}": v for k, v in spec.grid.items()}
    params.update(public_params(flatten(spec)))
    params["trials"] = len(expand(spec))
    return params


def _digest(*parts: str) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
