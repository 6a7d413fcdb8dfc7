"""The study's figure and table from MLflow runs, never training.

The figure is Figure 1 of the GN paper for this study: best validation mIoU against images per GPU, one
line per norm, a facet per backbone (rows) and crop (columns). The table lists every trial of the sweep,
failed ones with their reason. Both are written locally and logged to the sweep's parent run under
`report/`.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from mlflow.entities import Run

from orchestrator import tracking
from orchestrator.spec import redact

ARTIFACT_DIR = "report"
METRIC = "val_miou"
OFFICIAL = "val_miou_official"  # the BDD100K 2-class rule, where trials log it
SHOWN = ("FINISHED", "FAILED")  # runs still going (or killed with their driver) have no verdict yet
MARKERS = "osD^v<>ph*"


@dataclass(frozen=True)
class TrialRow:
    run_id: str
    name: str
    backbone: str
    norm: str
    batch_per_gpu: int | None
    crop: tuple[int, ...]  # [width, height] as the spec writes it
    best_val_miou: float | None  # max over the run's history: its checkpoint is its best epoch
    best_official: float | None
    last_epoch: int | None
    status: str  # FINISHED | FAILED
    failure: str | None

    @property
    def crop_text(self) -> str:
        return _crop_text(self.crop)


@dataclass(frozen=True)
class ReportResult:
    experiment: str
    sweep_run_id: str
    rows: list[TrialRow]  # sorted by backbone, crop, norm, batch per GPU
    figure: Path
    table: Path


def build_report(
    experiment: str | None, out_dir: Path, uri: str | None = None, sweep_run_id: str | None = None
) -> ReportResult:
    """Figure and table of one sweep's trials, written to out_dir and logged to the sweep's run.

    The sweep is sweep_run_id, else the latest sweep of `experiment`, else the latest sweep anywhere.
    Raises LookupError (one line) when there is no such experiment or sweep run, or it has no trials."""
    uri = uri or tracking.tracking_uri()
    sweep = _sweep_run(experiment, sweep_run_id, uri)
    sweep_id = sweep.info.run_id
    experiment, _ = tracking.run_names(sweep_id, uri)
    rows = trial_rows(sweep, uri)
    if not rows:
        raise LookupError(
            f"no finished or failed trial runs in sweep run {sweep_id} ({sweep.info.run_name!r}) "
            f"of experiment {experiment!r} at {redact(uri)}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    figure_path, table_path = out_dir / "report.png", out_dir / "report.md"
    plot(rows, title=f"{experiment} (sweep run {sweep_id[:8]})").savefig(figure_path, dpi=100)
    table_path.write_text(markdown(rows, experiment, sweep, figure_path.name))
    tracking.log_files(sweep_id, [figure_path, table_path], ARTIFACT_DIR, uri)
    return ReportResult(experiment, sweep_id, rows, figure_path, table_path)


def trial_rows(sweep: Run, uri: str | None = None) -> list[TrialRow]:
    runs = tracking.trial_runs(sweep.info.experiment_id, sweep.info.run_id, uri)
    rows = [_row(run, uri) for run in runs if run.info.status in SHOWN]
    return sorted(rows, key=lambda r: (r.backbone, r.crop, r.norm, r.batch_per_gpu or math.inf, r.name))


def plot(rows: list[TrialRow], title: str = "") -> Figure:
    """Facets backbone x crop (all that have a trial, an empty one says so), shared y; failed trials and
    trials without a val_miou are left out. The x axis runs from large to small batches, as in the paper."""
    backbones = sorted({r.backbone for r in rows})
    crops = sorted({r.crop for r in rows})
    norms = sorted({r.norm for r in rows})
    cmap = colormaps["tab10" if len(norms) <= 10 else "tab20"]
    style = {n: {"color": cmap(i), "marker": MARKERS[i % len(MARKERS)]} for i, n in enumerate(norms)}
    points = [r for r in rows if r.status == "FINISHED" and r.best_val_miou is not None and r.batch_per_gpu]
    batches = sorted({r.batch_per_gpu for r in rows if r.batch_per_gpu}) or [1]

    fig = Figure(figsize=(1.8 + 3.4 * len(crops), 0.8 + 2.8 * len(backbones)), layout="constrained")
    axes = fig.subplots(len(backbones), len(crops), sharex=True, sharey=True, squeeze=False)
    for ax_row, backbone in zip(axes, backbones, strict=True):
        for ax, crop in zip(ax_row, crops, strict=True):
            facet = [r for r in points if r.backbone == backbone and r.crop == crop]
            for norm in norms:
                # Other grid keys (lr, ...) can give several trials per point: the point is the best.
                best: dict[int, float] = {}
                for r in facet:
                    if r.norm == norm:
                        best[r.batch_per_gpu] = max(best.get(r.batch_per_gpu, -math.inf), r.best_val_miou)
                if best:
                    xs = sorted(best)
                    ax.plot(xs, [best[x] for x in xs], label=norm, **style[norm])
            if not facet:
                ax.text(0.5, 0.5, "no finished trials", transform=ax.transAxes, ha="center", color="gray")
            ax.set_title(f"{backbone}, crop {_crop_text(crop)}", fontsize="medium")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, labels=[str(b) for b in batches])
            ax.minorticks_off()
            ax.set_xlim(max(batches) * 1.3, min(batches) / 1.3)  # decreasing, as GN's Figure 1
            ax.grid(alpha=0.3)
    fig.supxlabel("batch size (images per GPU)")
    fig.supylabel("best val mIoU")
    if title:
        fig.suptitle(title)
    plotted = sorted({r.norm for r in points})
    if plotted:
        handles = [Line2D([], [], label=n, **style[n]) for n in plotted]
        fig.legend(handles=handles, title="norm", loc="outside right upper")
    return fig


def markdown(rows: list[TrialRow], experiment: str, sweep: Run, figure_name: str = "report.png") -> str:
    failed = sum(r.status == "FAILED" for r in rows)
    official = any(r.best_official is not None for r in rows)
    head = ["trial", "run", "backbone", "norm", "batch/GPU", "crop", "best val mIoU"]
    head += ["best official mIoU"] if official else []
    head += ["last epoch", "status", "failure"]
    lines = [
        f"# Normalization study: {sweep.info.run_name}",
        "",
        f"- experiment: `{experiment}`",
        f"- sweep run: `{sweep.info.run_id}` ({sweep.info.status})",
        f"- trials: {len(rows)} ({len(rows) - failed} finished, {failed} failed)",
        f"- made: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"![best val mIoU against batch per GPU]({figure_name})",
        "",
        _cells(head),
        _cells(["---"] * len(head)),
    ]
    for r in rows:
        cells = [r.name, r.run_id[:8], r.backbone, r.norm, _text(r.batch_per_gpu), r.crop_text]
        cells += [_text(r.best_val_miou)] + ([_text(r.best_official)] if official else [])
        cells += [_text(r.last_epoch), r.status, _text(r.failure)]
        lines.append(_cells(cells))
    return "\n".join(lines) + "\n"


def _sweep_run(experiment: str | None, run_id: str | None, uri: str) -> Run:
    where = redact(uri)
    exp_id = tracking.find_experiment_id(experiment, uri) if experiment else None
    if experiment and exp_id is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {where}")
    if run_id:
        run = tracking.find_run(run_id, uri)
        if run is None or run.data.tags.get(tracking.KIND) != "sweep":
            raise LookupError(f"no sweep run with id {run_id!r} at {where}")
        if exp_id and run.info.experiment_id != exp_id:
            raise LookupError(f"sweep run {run_id!r} is not in experiment {experiment!r} at {where}")
        return run
    run = tracking.latest_sweep_run([exp_id] if exp_id else None, uri)
    if run is None:
        scope = f"in experiment {experiment!r} " if experiment else ""
        raise LookupError(f"no sweep runs {scope}at {where}; run `orchestrator sweep SPEC` first")
    return run


def _row(run: Run, uri: str | None) -> TrialRow:
    params, metrics = run.data.params, run.data.metrics
    batch = params.get("train.batch_per_gpu", "")
    epoch = metrics.get("epoch")
    return TrialRow(
        run_id=run.info.run_id,
        name=run.info.run_name or run.data.tags.get(tracking.TRIAL_KEY, ""),
        backbone=params.get("model.backbone", "?"),
        norm=params.get("norm", "?"),
        batch_per_gpu=int(batch) if batch.isdecimal() else None,
        crop=tuple(int(v) for v in re.findall(r"\d+", params.get("train.crop", ""))),  # "[720, 720]"
        best_val_miou=_best(run, METRIC, uri),
        best_official=_best(run, OFFICIAL, uri),
        last_epoch=None if epoch is None else int(epoch),
        status=run.info.status,
        failure=run.data.tags.get(tracking.FAILURE),
    )


def _best(run: Run, key: str, uri: str | None) -> float | None:
    if key not in run.data.metrics:  # saves a query per trial that never logged it
        return None
    return tracking.best_value(run.info.run_id, key, uri)


def _crop_text(crop: tuple[int, ...]) -> str:
    return "x".join(map(str, crop)) or "?"


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(str(value).split())  # one table row: no newlines
    return text if len(text) <= 200 else text[:197] + "..."


def _cells(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
