"""Inference that ends in an MLflow run: `orchestrator evaluate` of one model, and `orchestrator ensemble`
of the best trials (members and ensemble scored together in one pass over the split). Each logs its
settings, metrics, per-image CSV, histogram and best/worst overlays."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator import tracking
from orchestrator.data.storage import url_to_fs
from orchestrator.inference.evaluate import Combine, evaluate_checkpoints
from orchestrator.inference.predict import WHOLE, InferenceSettings


@dataclass
class EnsembleResult:
    members: list[tuple[str, str, dict[str, float]]]  # (run id, run name, metrics)
    metrics: dict[str, float]
    run_id: str


def run_ensemble(
    experiment: str,
    top: int = 3,
    metric: str = "val_miou",
    data: str | None = None,
    batch_size: int = 2,
    storage_options: dict | None = None,
    *,
    filter_string: str | None = None,
    settings: InferenceSettings = WHOLE,
    combine: Combine = "mean",
    command: str | None = None,
) -> EnsembleResult:
    """Pick the `top` finished trials by `metric` (among those matching `filter_string`), ensemble them on
    the validation split (`data`, default: the best member's `data.val`) with the inference `settings`
    and `combine` rule ("weighted": by each member's best `metric`), and log the ensemble run: members,
    settings, metrics of the ensemble and of each member, and the ensemble's per-image scores and
    best/worst overlays; `command` (the command line) is tagged on the run."""
    ranked = tracking.top_trial_runs(experiment, metric, top, filter_string=filter_string)
    if len(ranked) < top:
        matching = f" matching {filter_string!r}" if filter_string else ""
        raise LookupError(
            f"--top {top}: experiment {experiment!r} has {len(ranked)} finished trial configuration(s)"
            f"{matching} with metric {metric!r} and a checkpoint (runs of the same params count once)"
        )
    runs = [run for run, _ in ranked]
    weights = [best for _, best in ranked] if combine == "weighted" else None
    paths = [tracking.cached_checkpoint(run.info.run_id) for run in runs]
    with tempfile.TemporaryDirectory() as out:
        report = evaluate_checkpoints(
            paths, data, settings, combine=combine, weights=weights, batch_size=batch_size, out_dir=out,
            storage_options=storage_options,
        )  # fmt: skip
        ids = [r.info.run_id for r in runs]
        members = report.member_metrics
        run_id = tracking.log_derived_run(
            experiment,
            kind="ensemble",
            name=f"ensemble-top{len(ids)}",
            params={
                "metric": metric,
                "top": top,
                "filter": filter_string or "",
                "data.val": report.data,
                "combine": combine,
                "members": ",".join(ids),
                **settings.as_params(),
            },  # fmt: skip
            metrics={
                **report.metrics,
                **{f"member{i}_val_miou": m["val_miou"] for i, m in enumerate(members)},
            },
            tags={"orchestrator.members": ",".join(ids), **tracking.command_tag(command)},
            files={"predictions": out},
        )
    scores = [(r.info.run_id, r.info.run_name, m) for r, m in zip(runs, members, strict=True)]
    return EnsembleResult(scores, report.metrics, run_id)


@dataclass
class EvaluationResult:
    name: str
    metrics: dict[str, float]
    run_id: str
    experiment: str


def evaluate_model(
    model: str,
    settings: InferenceSettings = WHOLE,
    *,
    data: str | None = None,
    batch_size: int = 2,
    experiment: str | None = None,
    storage_options: dict | None = None,
    command: str | None = None,
) -> EvaluationResult:
    """Score an MLflow run's best checkpoint (model = run id) or a checkpoint file at a path/URI, and log an
    `evaluation` run: in the source run's experiment, or `experiment` (default "evaluation"); `command` (the
    command line) is tagged on it."""
    with tempfile.TemporaryDirectory() as d:
        if tracking.is_run(model):
            path, source = tracking.cached_checkpoint(model), model
            experiment, name = tracking.run_names(model)
        else:
            path, source = _fetch(model, Path(d), storage_options), ""
            experiment, name = experiment or "evaluation", Path(model).name
        out = Path(d) / "predictions"
        report = evaluate_checkpoints(
            [path], data, settings, batch_size=batch_size, out_dir=out, storage_options=storage_options
        )
        run_id = tracking.log_derived_run(
            experiment,
            kind="evaluation",
            name=f"{name} {settings.mode}",
            params={"source": source or model, "data.val": report.data, **settings.as_params()},
            metrics=report.metrics,
            tags={**({"orchestrator.source_run": source} if source else {}), **tracking.command_tag(command)},
            files={"predictions": out},
        )
    return EvaluationResult(name, report.metrics, run_id, experiment)


def _fetch(uri: str, folder: Path, storage_options: dict | None) -> Path:
    """A local copy of the checkpoint at a path or fsspec URI."""
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise LookupError(f"{uri} is neither an MLflow run id nor an existing checkpoint file")
    local = folder / "model.pt"
    fs.get_file(path, str(local))
    return local
