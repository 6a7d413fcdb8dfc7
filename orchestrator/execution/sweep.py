"""Ray Tune + Ray Train: one Tune trial per grid point, each a driver function that runs a Ray Train
data-parallel trainer (the Train V2 pattern: `Tuner(TorchTrainer(...))` is not supported). Tune's param space
is the list of trials `spec.expand` gives; each trial's validated spec travels as it is to its driver and
workers.

`orchestrator train` runs the same driver function for a single point without Tune.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

import orchestrator.execution.ray_private  # noqa: F401  (its import refuses a Ray it was not written for)
from orchestrator import tracking
from orchestrator.data import resample
from orchestrator.data.shards import read_manifest
from orchestrator.errors import UsageError
from orchestrator.execution import cluster
from orchestrator.execution.progress import SweepProgress
from orchestrator.execution.schedulers import make_scheduler, tune_mode
from orchestrator.execution.stop_requests import stop_requests
from orchestrator.execution.trial_slots import slot, trial_slots
from orchestrator.execution.tune_report import EpochReportCallback
from orchestrator.gpus import GPUS
from orchestrator.masking import redact
from orchestrator.spec import Spec, SpecError, Trial, expand, flatten, public_document, public_params

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    key: str
    status: str  # FINISHED | FAILED | DIVERGED | STOPPED (tracking.OUTCOMES, upper case)
    metrics: dict[str, float]
    error: str | None = None  # why it failed, diverged or was stopped


def run_sweep(
    spec: Spec,
    resume: bool = False,
    command: str | None = None,
    quiet: bool = False,
    gpu: str | None = None,
    skip_unfit: bool = False,
) -> list[TrialOutcome]:
    """Run every grid point of the spec as a Tune trial; returns one outcome per point run.

    resume: restore the spec's Tune experiment (after its driver died): finished trials stay finished,
    the others continue from their last checkpoints, under the same MLflow runs.
    command: the command line, kept as a tag of the sweep run it starts (a resumed run keeps its own).
    quiet: the console shows the trials' progress (progress.SweepProgress) instead of Tune's status tables,
    and the workers' output goes to Python logging (logger orchestrator.workers) instead of the console.
    gpu, skip_unfit: see `fit`."""
    uri = tracking.tracking_uri()
    tune_path = f"{cluster.storage(spec).rstrip('/')}/{spec.name}"
    tune_fs, tune_fs_path = cluster.ray_storage(tune_path)  # before Ray starts: a storage scheme's driver
    points = expand(spec)
    scheduler = make_scheduler(spec.search, points, tune_path)  # and a scheduler with nothing to do
    cluster.init_ray(worker_output_to_log=quiet)
    trials = fit(points, gpu, skip_unfit)
    cluster.check_cluster(spec, trials, uri)  # a refused sweep never reaches MLflow
    tracking.check_reachable(uri)  # an MLflow down fails the sweep here, not in its first trial
    experiment_id = tracking.ensure_experiment(spec.experiment, uri)
    if resume and not tune.Tuner.can_restore(tune_fs_path, storage_filesystem=tune_fs):
        raise UsageError(f"nothing to resume at {tune_path}: run `orchestrator sweep` without --resume")
    parent = resume and tracking.resume_sweep_run(experiment_id, tune_path, uri)
    if not parent:
        parent = _start_sweep_run(spec, trials, experiment_id, uri, tune_path)
        tracking.tag_command(parent, command, uri)
    # The sweep's actors, found by name by its trials: created here and held until the trials end, since a
    # named actor that is not detached dies once its creator holds no handle to it.
    owned = [trial_slots(tune_path, spec.resources.max_concurrent_trials)]
    if scheduler:
        owned.append(stop_requests(tune_path))
    # Tune prints its trials' config and saves it on storage: the trials go there without their storage
    # options (s3fs credentials can be in them), which reach the drivers through Ray's object store.
    trainable = tune.with_parameters(
        _tune_trial,
        experiment_id=experiment_id,
        parent_run_id=parent,
        tracking_uri=uri,
        storage_options={t.key: t.spec.data.storage_options for t in trials},
        sweep=tune_path,
        scheduled=scheduler is not None,
    )
    trainable = tune.with_resources(trainable, cluster.DRIVER_RESOURCES)
    # Tune saves the trials (objects) as references in its experiment state and takes them again on restore.
    param_space = {"trial": tune.grid_search([t.without_secrets() for t in trials])}
    callbacks = [CSVLoggerCallback(), JsonLoggerCallback()]  # no TensorBoard: see WORKER_ENV
    if quiet:
        callbacks.append(SweepProgress(trials))
        # Tune's current console output prints its experiment's table at every verbosity; its legacy
        # output, which this selects, prints nothing at verbose=0.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if resume:
        tuner = tune.Tuner.restore(
            tune_fs_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=param_space,
            storage_filesystem=tune_fs,
        )
    else:
        storage_fs, storage_path = cluster.ray_storage(cluster.storage(spec))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.resources.max_concurrent_trials,
                metric=spec.search.metric,
                mode=tune_mode(spec.search),
                scheduler=scheduler,
                # The next trial's driver runs in the last one's process: no new Python to start and
                # import torch, Ray Train and MLflow into (~4 s of each hand-over on 2 cores).
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                verbose=0 if quiet else 1,
                callbacks=callbacks,
            ),
        )
    results = tuner.fit()
    del owned  # the trials have ended
    ended = {
        r.data.tags[tracking.TRIAL_KEY]: (tracking.outcome(r), r.data.tags.get(tracking.ENDED_EARLY))
        for r in tracking.trial_runs(experiment_id, parent, uri)
    }
    outcomes = []
    for result in results:
        key = result.config["trial"].key
        metrics = dict(result.metrics or {})
        if result.error is not None:
            outcomes.append(TrialOutcome(key, "FAILED", metrics, _reason(result.error)))
        else:
            status, reason = ended.get(key, ("finished", None))
            outcomes.append(TrialOutcome(key, status.upper(), metrics, reason))
    failed = any(o.status == "FAILED" for o in outcomes)
    _end_sweep_run(trials, outcomes, experiment_id, parent, uri)
    tracking.end_run(parent, uri, failed=failed)
    return outcomes


def run_single(spec: Spec, command: str | None = None, gpu: str | None = None) -> TrialOutcome:
    """One trial (the spec's base point, grid ignored) through the same driver, without Tune; `command`
    is tagged on its sweep run; gpu: see `fit`."""
    uri = tracking.tracking_uri()
    cluster.ray_storage(cluster.storage(spec))  # a storage scheme without its driver fails before Ray starts
    cluster.init_ray()
    trials = fit(expand(spec.model_copy(update={"grid": {}})), gpu)
    cluster.check_cluster(spec, trials, uri)
    tracking.check_reachable(uri)
    experiment_id = tracking.ensure_experiment(spec.experiment, uri)
    parent = _start_sweep_run(spec, trials, experiment_id, uri)
    tracking.tag_command(parent, command, uri)
    (trial,) = trials
    try:
        outcome = run_trial(trial, experiment_id, parent, uri, callbacks=[])
    except Exception as e:
        outcome = TrialOutcome("base", "FAILED", {}, _reason(e))
    _end_sweep_run(trials, [outcome], experiment_id, parent, uri)
    tracking.end_run(parent, uri, failed=outcome.status == "FAILED")
    return outcome


def fit(trials: list[Trial], gpu: str | None, skip_unfit: bool = False) -> list[Trial]:
    """The trials to run, each worker checked by `orchestrator plan`'s estimate against the memory it holds
    (plan.fit_trials): on GPUs of kind `gpu` (a key of gpus.GPUS), else of the joined cluster's kind, its
    share of one, `auto` batches and shares chosen; on the CPU, its CPUs' share of a node's memory. Points
    that cannot fit are refused (SpecError) or, with skip_unfit, left out. Trials on GPUs of no known kind
    are not checked, and an `auto` among them is refused."""
    nodes = cluster.alive_nodes()
    if gpu is None and any(t.spec.resources.gpus_per_worker for t in trials):
        gpu = cluster.gpu_kind(nodes)
    for t in trials:
        on_gpu = t.spec.resources.gpus_per_worker
        if t.spec.train.batch_per_gpu == "auto" and not on_gpu:
            raise SpecError([
                "train.batch_per_gpu: auto is chosen for a GPU's memory; a trial on the CPU "
                f"(resources.gpus_per_worker: 0, grid point {t.key}) names its batch"
            ])  # fmt: skip
        if gpu is None and "auto" in (t.spec.train.batch_per_gpu, on_gpu):
            field = (
                "train.batch_per_gpu" if t.spec.train.batch_per_gpu == "auto" else "resources.gpus_per_worker"
            )
            raise SpecError([
                f"{field}: auto is chosen for the GPUs' memory, and their kind is not known: pass --gpu "
                f"({', '.join(GPUS)}), or run on a cluster with GPU nodes"
            ])  # fmt: skip
    from orchestrator.plan import fit_trials  # torch, for the meta device

    fitted, skipped = fit_trials(trials, gpu, nodes, skip_unfit)
    if skipped:
        log.warning("skipped, not fitting the memory their workers hold:\n%s", "\n".join(skipped))
    return fitted


def run_trial(
    trial: Trial,
    experiment_id: str,
    parent_run_id: str,
    tracking_uri: str,
    callbacks: list,
    on_finished: Callable[[dict[str, float]], None] | None = None,
    sweep: str | None = None,
) -> TrialOutcome:
    """The driver of one trial: open its MLflow child run, fit a Ray Train trainer, close the run; raises
    TrialFailed (or the workers' error) for a failed trial.

    A trial whose run already ended finished, diverged or stopped (its driver died after it, before Tune
    recorded it) is not run again: its metrics go to `on_finished` (Tune needs a result).
    sweep: the Tune experiment whose scheduler may ask the trial to stop (execution/stop_requests.py)."""
    spec, key = trial.spec, trial.key
    done = tracking.find_trial_run(experiment_id, parent_run_id, key, tracking_uri)
    ended = done and tracking.outcome(done)
    if done and done.info.status in ("FINISHED", "KILLED") and ended != "failed":
        log.info("trial %s ended in an earlier run of this sweep: kept", key)
        if on_finished:
            on_finished(done.data.metrics)
        reason = done.data.tags.get(tracking.ENDED_EARLY)
        return TrialOutcome(key, ended.upper(), dict(done.data.metrics), reason)
    run_id = tracking.start_trial_run(
        experiment_id, parent_run_id, key, public_params(trial.config), tracking_uri, trial.name
    )
    _log_datasets(spec, run_id, tracking_uri)
    try:
        repeats = _sample_repeats(spec, run_id, tracking_uri)
    except (LookupError, ValueError) as e:
        tracking.end_trial_run(run_id, tracking_uri, failure=str(e))
        raise TrialFailed(str(e)) from None
    # Imported here, in the trial's driver: the sweep's own process never starts a Ray Train run.
    from orchestrator.execution.trainer import Ledger, Trainer, train_loop_per_worker

    r = spec.resources
    storage_fs, storage_path = cluster.ray_storage(cluster.storage(spec))
    trainer = Trainer(
        train_loop_per_worker,
        ledger=Ledger(run_id, tracking_uri),
        train_loop_config={
            "trial": trial,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "repeats": repeats,
            "stop_requests": stop_requests(sweep) if sweep else None,
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
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A dead worker or node restarts the worker group from the last checkpoint; a preempted node
            # from the one its workers wrote on notice (train/loop.py), on its own count.
            failure_config=FailureConfig(
                max_failures=r.max_failures, max_preemption_failures=r.max_preemptions
            ),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.end_trial_run(run_id, tracking_uri, failure=_reason(e))
        raise
    # Rank 0 records a failure not worth a retry, or why the trial ended early.
    ended, reason = tracking.end_trial_run(run_id, tracking_uri)
    if ended == "failed":
        raise TrialFailed(reason)
    return TrialOutcome(key, ended.upper(), dict(result.metrics or {}), reason)


def _log_datasets(spec: Spec, run_id: str, uri: str) -> None:
    """The trial's splits as its run's MLflow dataset inputs. A split this driver cannot read is left out
    (logged here): the workers read it too, and their error names it."""
    splits = {}
    for context, url in (("training", spec.data.train), ("validation", spec.data.val)):
        try:
            splits[context] = (url, read_manifest(url, spec.data.storage_options))  # redacted there
        except (OSError, ValueError) as e:
            log.info("%s data %s is not logged as an MLflow input: %s", context, redact(url), e)
    tracking.log_datasets(run_id, splits, uri)


def _sample_repeats(spec: Spec, run_id: str, uri: str) -> dict[str, int] | None:
    """train.sample_weights_from as copies per training sample id, planned once by the trial's driver (the
    workers get the plan, not MLflow access); what it did goes to the trial's params."""
    if spec.train.sample_weights_from is None:
        return None
    scores = tracking.per_image_scores(spec.train.sample_weights_from, spec.train.sample_score, uri)
    repeats, summary = resample.plan(spec.data, spec.train, scores)
    tracking.log_params(run_id, summary, uri)
    return repeats


def _tune_trial(
    config: dict[str, Any],
    experiment_id: str,
    parent_run_id: str,
    tracking_uri: str,
    storage_options: dict[str, dict[str, Any]],
    sweep: str,
    scheduled: bool,
) -> None:
    trial = config["trial"]
    trial = trial.with_storage_options(storage_options[trial.key])
    callbacks = [EpochReportCallback()]
    concurrent = trial.spec.resources.max_concurrent_trials  # one value for the sweep (spec.load)
    with slot(trial_slots(sweep, concurrent), trial.key, concurrent):
        stops = sweep if scheduled else None
        run_trial(trial, experiment_id, parent_run_id, tracking_uri, callbacks, tune.report, stops)


class TrialFailed(RuntimeError):
    """A trial that ended for a reason of its own (a non-finite loss, out of memory)."""


def _reason(error: BaseException) -> str:
    """The last line of an error: the message, without the tracebacks Ray wraps it in."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _start_sweep_run(
    spec: Spec, trials: list[Trial], experiment_id: str, uri: str, tune_path: str | None = None
) -> str:
    """The sweep's MLflow run, which reads as a sweep: the grid's axes and the settings they do not vary as
    its params (a point's values are its trials': a search by `params.norm` finds trials alone), what it
    sweeps as its description, the spec it runs as `spec.yaml`; and the experiment's runs view set to lead
    with the trials' headline metric."""
    params = {f"grid.{k}": v for k, v in spec.grid.items()}
    params |= {k: v for k, v in public_params(flatten(spec)).items() if k not in spec.grid}
    params["trials"] = len(trials)
    run_id = tracking.start_sweep_run(experiment_id, spec.name, params, uri, tune_path)
    t, m = spec.train, spec.model
    axes = " x ".join(f"{k} ({len(v)})" for k, v in spec.grid.items()) or "one trial, no grid"
    description = (
        f"Sweep {spec.name}: {axes}, {len(trials)} trial{'s' * (len(trials) != 1)} of {m.backbone} "
        f"({m.head or 'its head'}), {t.epochs} epochs, nested under this run. Its trials lead with "
        f"{tracking.HEADLINE}: their best epoch's val mIoU ({tracking.HEADLINE_EPOCH}), the checkpoint they "
        "keep. The spec it runs: spec.yaml."
    )
    tracking.describe_sweep_run(run_id, description, public_document(spec), uri)
    tracking.share_view(experiment_id, list(spec.grid), uri)
    return run_id


def _end_sweep_run(
    trials: list[Trial], outcomes: list[TrialOutcome], experiment_id: str, run_id: str, uri: str
) -> None:
    """What the sweep's trials came to, on its run: how many ended how (metrics trials_finished, ...), the
    best headline of a finished trial (best_trial_val_miou) and its name, and what they spent
    (tracking.sum_costs)."""
    counts = Counter(o.status.lower() for o in outcomes)
    metrics = {f"trials_{status}": counts[status] for status in tracking.OUTCOMES}
    ended = ", ".join(f"{counts[status]} {status}" for status in tracking.OUTCOMES if counts[status])
    scored = [
        o
        for o in outcomes
        if o.status == "FINISHED" and math.isfinite(o.metrics.get(tracking.HEADLINE, math.nan))
    ]
    if scored:
        best = max(scored, key=lambda o: o.metrics[tracking.HEADLINE])
        # Named apart from the trials' headline: sorted by it, the runs table lists trials, not the sweep.
        metrics[f"best_trial_{tracking.HEADLINE.removeprefix('best_')}"] = best.metrics[tracking.HEADLINE]
        name = {t.key: t.name for t in trials}.get(best.key, best.key)
        ended += f"; the best, {name}: {tracking.HEADLINE} {best.metrics[tracking.HEADLINE]:.4f}"
    tracking.conclude_sweep_run(run_id, metrics, f"{len(outcomes)} trials: {ended}.", uri)
    tracking.sum_costs(experiment_id, run_id, uri)


def _digest(*parts: str) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
