"""Inference that ends in an MLflow run: `orchestrator evaluate` of one model, `orchestrator ensemble` of
the best trials (members and ensemble scored together in one pass over the split), and `orchestrator
predict` of a trial or an ensemble run into BDD100K's submission files. Evaluations log their settings,
metrics, per-image CSV, histogram and best/worst overlays; predictions the files written. Each runs in
this process or, with the CLI's `--workers`, as Ray work (`Where`). Unreadable images fail each of them,
or with `skip_bad` are left out: every run logs how many images its scores are over (`Coverage.params`)
and lists those left out (SKIPPED_FILE)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator import checkpoints, tracking
from orchestrator.data.shards import is_labeled, read_manifest
from orchestrator.errors import UsageError, shown
from orchestrator.inference.evaluate import SKIPPED_FILE, Combine, Coverage, skipped_text
from orchestrator.inference.parts import (
    Device,
    Output,
    PartsRunner,
    Pass,
    evaluate_checkpoints,
    run_pass,
    sample_ids,
)
from orchestrator.inference.predict import WHOLE, InferenceSettings
from orchestrator.inference.submission import RLE_FILE, Format, mask_name, write_rle
from orchestrator.storage import join, url_to_fs


@dataclass(frozen=True)
class Where:
    """Where inference runs: this process (runner None) or where `runner` runs a pass's parts (the CLI's
    `--workers`: Ray workers, execution.inference.on_ray); on `device`."""

    runner: PartsRunner | None = None
    device: Device = "auto"


HERE = Where()


@dataclass
class EnsembleResult:
    members: list[tuple[str, str, dict[str, float]]]  # (run id, run name, metrics)
    metrics: dict[str, float]
    run_id: str
    model: str  # the registered model
    versions: dict[str, str]  # its aliases: best_trial, ensemble, champion -> version
    coverage: Coverage
    left_out: dict[str, int]  # trials that ended early (diverged, stopped), by outcome: never members


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
    where: Where = HERE,
    register: str | None = None,
    command: str | None = None,
    skip_bad: bool = False,
) -> EnsembleResult:
    """Pick the `top` finished trials by `metric` (among those matching `filter_string`), ensemble them on
    the validation split (`data`, default: the best member's `data.val`) with the inference `settings`
    and `combine` rule ("weighted": by each member's best `metric`), and log the ensemble run: members,
    settings, metrics of the ensemble and of each member, and the ensemble's per-image scores and
    best/worst overlays; `command` (the command line) is tagged on the run. The best trial and the
    ensemble are registered as pyfunc models of `register` (default: the experiment's name), aliased
    best_trial, ensemble and champion (the better of the two by `metric` on this split)."""
    ranked = tracking.top_trial_runs(experiment, metric, top, filter_string=filter_string)
    left_out = tracking.ended_early(experiment)
    if len(ranked) < top:
        matching = f" matching {filter_string!r}" if filter_string else ""
        early = f"; {ended_early_text(left_out)}" if left_out else ""
        raise LookupError(
            f"--top {top}: experiment {experiment!r} has {len(ranked)} finished trial configuration(s)"
            f"{matching} with metric {metric!r} and a checkpoint (runs of the same params count once){early}"
        )
    runs = [run for run, _ in ranked]
    weights = [best for _, best in ranked] if combine == "weighted" else None
    paths = [tracking.cached_checkpoint(run.info.run_id) for run in runs]
    with tempfile.TemporaryDirectory() as out:
        report = evaluate_checkpoints(
            paths, data, settings, combine=combine, weights=weights, batch_size=batch_size, out_dir=out,
            device=where.device, storage_options=storage_options, skip_bad=skip_bad, runner=where.runner,
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
                **report.evaluation.coverage.params(),
            },  # fmt: skip
            metrics={
                **report.metrics,
                **{f"member{i}_val_miou": m["val_miou"] for i, m in enumerate(members)},
            },
            tags={"orchestrator.members": ",".join(ids), **tracking.command_tag(command)},
            files={"predictions": out},
            sources=ids,
            data={"validation": (report.data, read_manifest(report.data, storage_options))},
        )
    name = register or experiment
    with tempfile.TemporaryDirectory() as d:
        names = [r.info.run_name for r in runs]
        models = {"best_trial": f"best trial {names[0]}", "ensemble": f"ensemble of {len(runs)} ({combine})"}
        versions = _register(
            name, runs[0].info.run_id, run_id, paths, settings, combine, weights, Path(d), models
        )
    key = metric if metric in report.metrics else "val_miou"
    better = report.metrics[key] > members[0][key]  # a tie goes to the single model: cheaper to run
    champion = "ensemble" if better else "best_trial"
    tracking.set_model_aliases(name, {**versions, "champion": versions[champion]})
    scored = {"best_trial": members[0], "ensemble": report.metrics}
    split = f"{report.data} ({report.evaluation.coverage.scored} images)"
    for alias, version in versions.items():
        if alias == "ensemble" and version == versions["best_trial"]:
            continue  # an ensemble of one is its best trial
        why = [
            f"ensemble: the top {len(names)} trials by {metric} ({', '.join(names)}), combined by {combine}"
            if alias == "ensemble"
            else f"best_trial: the best finished trial by {metric}"
        ]
        if version == versions[champion]:
            other = "best_trial" if champion == "ensemble" else "ensemble"
            why.append(
                f"champion: the better of best_trial and ensemble by {key} on this split "
                f"({scored[champion][key] - scored[other][key]:+.4f} over the {other.replace('_', ' ')})"
            )
        tracking.describe_model_version(
            name,
            version,
            f"{models[alias]}, from experiment {experiment!r}: {key} {scored[alias][key]:.4f} on {split}.\n\n"
            + "\n\n".join(why),
        )
    scores = [(r.info.run_id, r.info.run_name, m) for r, m in zip(runs, members, strict=True)]
    aliases, coverage = tracking.model_aliases(name), report.evaluation.coverage
    return EnsembleResult(scores, report.metrics, run_id, name, aliases, coverage, left_out)


def ended_early_text(counts: dict[str, int]) -> str:
    """Trials that are no ensemble's candidates, in words ("not candidates: 2 diverged, 1 stopped ...")."""
    return "not candidates: " + ", ".join(f"{n} {o}" for o, n in counts.items()) + " trial(s), unfinished"


def _register(
    name: str,
    best_run: str,
    ensemble_run: str,
    paths: list[Path],
    settings: InferenceSettings,
    combine: Combine,
    weights: list[float] | None,
    folder: Path,
    models: dict[str, str],
) -> dict[str, str]:
    """The best trial and the ensemble as pyfunc models (one, when the ensemble has one member), registered
    under `name`, their logged models named as `models` says ({"best_trial": ..., "ensemble": ...}):
    {"best_trial": version, "ensemble": version}."""
    from orchestrator.inference.served import CODE, EXAMPLE, artifacts, requirements

    needs = requirements()
    (folder / "best").mkdir()
    files = artifacts(paths[:1], settings, "mean", None, folder / "best")
    best = tracking.log_model(best_run, CODE, files, name, models["best_trial"], needs, EXAMPLE)
    if len(paths) == 1:
        return {"best_trial": best, "ensemble": best}
    (folder / "ensemble").mkdir()
    files = artifacts(paths, settings, combine, weights, folder / "ensemble")
    ensemble = tracking.log_model(ensemble_run, CODE, files, name, models["ensemble"], needs, EXAMPLE)
    return {"best_trial": best, "ensemble": ensemble}


@dataclass
class EvaluationResult:
    name: str
    metrics: dict[str, float]
    run_id: str
    experiment: str
    coverage: Coverage


def evaluate_model(
    model: str,
    settings: InferenceSettings = WHOLE,
    *,
    data: str | None = None,
    batch_size: int = 2,
    experiment: str | None = None,
    storage_options: dict | None = None,
    where: Where = HERE,
    command: str | None = None,
    skip_bad: bool = False,
) -> EvaluationResult:
    """Score an MLflow run's best checkpoint (model = run id) or a checkpoint file at a path/URI, and log an
    `evaluation` run: in the source run's experiment, or `experiment` (default "evaluation"); `command` (the
    command line) is tagged on it."""
    tracking.check_reachable()  # a checkpoint file reaches MLflow only to log the scores, after the pass
    with tempfile.TemporaryDirectory() as d:
        if tracking.is_run(model):
            path, source = tracking.cached_checkpoint(model), model
            experiment, name = tracking.run_names(model)
        else:
            path, source = _fetch(model, Path(d), storage_options), ""
            experiment, name = experiment or "evaluation", Path(model).name
        out = Path(d) / "predictions"
        report = evaluate_checkpoints(
            [path], data, settings, batch_size=batch_size, out_dir=out, device=where.device,
            storage_options=storage_options, skip_bad=skip_bad, runner=where.runner,
        )  # fmt: skip
        coverage = report.evaluation.coverage
        run_id = tracking.log_derived_run(
            experiment,
            kind="evaluation",
            name=f"{name} {settings.mode}",
            params={
                "source": source or model,
                "data.val": report.data,
                **settings.as_params(),
                **coverage.params(),
            },
            metrics=report.metrics,
            tags={**({"orchestrator.source_run": source} if source else {}), **tracking.command_tag(command)},
            files={"predictions": out},
            sources=[source] if source else [],
            data={"validation": (report.data, read_manifest(report.data, storage_options))},
        )
    return EvaluationResult(name, report.metrics, run_id, experiment, coverage)


def _fetch(uri: str, folder: Path, storage_options: dict | None) -> Path:
    """A local copy of the checkpoint at a path or fsspec URI."""
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise LookupError(f"{uri} is neither an MLflow run id nor an existing checkpoint file")
    local = folder / "model.pt"
    fs.get_file(path, str(local))
    return local


@dataclass
class PredictionResult:
    written: str  # the masks' folder, or the RLE file
    coverage: Coverage  # scored: the images predicted
    metrics: dict[str, float]  # of a labelled split, else empty
    run_id: str
    experiment: str


def predict_run(
    run_id: str,
    data: str,
    out: str,
    *,
    format: Format = "masks",
    settings: InferenceSettings = WHOLE,
    batch_size: int = 2,
    storage_options: dict | None = None,
    where: Where = HERE,
    command: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> PredictionResult:
    """Predict every image of the packed split `data` (labelled or not) with a trial run's best checkpoint,
    or an ensemble run's members combined as that run combined them, into `out` in `format`; log a
    `prediction` run in the source run's experiment holding the files written (and, for a labelled split,
    the scores of what was written). `out` is a new or empty folder, or with `overwrite` any folder: files
    of the same names are replaced, the others kept (and not logged). With `skip_bad`, unreadable images
    get no prediction and are listed in `out`/SKIPPED_FILE."""
    source = tracking.find_run(run_id)
    if source is None:
        raise LookupError(f"{run_id} is not an MLflow run id at {tracking.tracking_uri()}")
    _check_out(out, overwrite, storage_options)  # before the checkpoints are fetched
    members, combine, weights = _predictors(source)
    states = tuple(checkpoints.load(tracking.cached_checkpoint(m)) for m in members)
    job = Pass(
        states, data, settings, combine, weights, batch_size, device=where.device,
        output=Output(out, format), storage_options=storage_options,
    )  # fmt: skip
    evaluation, frames = run_pass(job, skip_bad=skip_bad, runner=where.runner)
    written = write_rle(out, frames, storage_options) if format == "rle" else out
    manifest = read_manifest(data, storage_options)
    scores = evaluation.summary() if is_labeled(manifest) else {}
    coverage = evaluation.coverage
    names = [RLE_FILE]  # what this command wrote in `out`: the files it logs
    if format == "masks":
        left_out = set(coverage.skipped)
        names = [mask_name(i) for i in sample_ids(manifest) if i not in left_out]
    if coverage.skipped:
        fs, root = url_to_fs(out, storage_options)
        fs.pipe_file(join(root, SKIPPED_FILE), skipped_text(evaluation.unreadable))
        names.append(SKIPPED_FILE)
    experiment, name = tracking.run_names(run_id)
    with tempfile.TemporaryDirectory() as d:
        run = tracking.log_derived_run(
            experiment,
            kind="prediction",
            name=f"{name} {format}",
            params={
                "source": run_id,
                "data": data,
                "out": out,
                "format": format,
                "combine": combine,
                "members": ",".join(members),
                **settings.as_params(),
                **coverage.params(),
            },  # fmt: skip
            metrics=scores,
            tags={"orchestrator.source_run": run_id, **tracking.command_tag(command)},
            files={"predictions": _copies(out, names, Path(d), storage_options)},
            sources=[run_id],
            data={"prediction": (data, manifest)},
        )
    return PredictionResult(written, coverage, scores, run, experiment)


def _check_out(out: str, overwrite: bool, storage_options: dict | None) -> None:
    """Refuse an `out` that is a file, or (without `overwrite`) a folder that holds anything: predictions
    written among other files could not be told from them."""
    fs, path = url_to_fs(out, storage_options)
    if fs.isfile(path):
        raise UsageError(f"--out {shown(out)} is a file: want a folder, new or empty (any with --overwrite)")
    held = fs.ls(path, detail=False) if fs.isdir(path) else []
    if held and not overwrite:
        raise UsageError(
            f"--out {shown(out)} holds {len(held)} entries: want a new or empty folder, or --overwrite to "
            "write into this one"
        )


def _predictors(run) -> tuple[list[str], Combine, tuple[float, ...] | None]:
    """(member run ids, combine, weights) of a trial run (itself) or an ensemble run (its members, as it
    combined them)."""
    kind = run.data.tags.get(tracking.KIND)
    if kind != "ensemble":
        return [run.info.run_id], "mean", None
    members, params = run.data.tags["orchestrator.members"].split(","), run.data.params
    combine = params.get("combine", "mean")
    weights = None
    if combine == "weighted":
        weights = tuple(tracking.best_value(m, params["metric"]) for m in members)
    return members, combine, weights


def _copies(url: str, names: list[str], folder: Path, storage_options: dict | None) -> Path:
    """A local folder (in `folder`) holding copies of the files `names` of the folder at `url`: what a
    command wrote there, without what else the folder holds."""
    fs, root = url_to_fs(url, storage_options)
    local = folder / "copies"
    local.mkdir()
    fs.get([join(root, n) for n in names], f"{local}/")
    return local
