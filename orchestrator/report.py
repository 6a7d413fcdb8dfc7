"""The study's figure and document from MLflow runs, never training.

The figure is Figure 1 of the GN paper for this study: best validation mIoU against images per GPU, one
line per norm, a facet per backbone (rows) and crop and protocol (columns: what `train.budget` held equal,
epochs, steps or images, as the document says in words). Trials that differ only in `train.seed` are
one configuration: its point is the mean over its seeds, its error bar their min..max. The document holds
the sweep's wall time, the trials' durations, the latest ensemble's gain over its best member, the command
lines that made the runs (and this report), the figure, a norm x batch table per facet, a table of the
configurations and one of every trial, failed ones with their reason. Everything in it comes from MLflow.
Both files are written locally (`--out` folder, or `--doc` path with the figure beside it) and logged to
the sweep's parent run under `report/`.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from mlflow.entities import Run

from orchestrator import tracking
from orchestrator.bootstrap import LEVEL, RESAMPLES, Difference, paired_difference
from orchestrator.errors import UsageError
from orchestrator.masking import redact
from orchestrator.spec import Budget

ARTIFACT_DIR = "report"
METRIC = "val_miou"
OFFICIAL = "val_miou_official"  # the BDD100K 2-class rule, where trials log it
SEED = "train.seed"  # trials that differ only in it are one configuration
BASELINE = "bn"  # the norm every other is compared with at each batch per GPU, unless others are named
# A finished trial whose val mIoU rose more than this in its last epoch is still improving: its score is
# not converged, and a conclusion drawn from it may change with a longer budget.
STILL_IMPROVING = 0.005
# Runs still going (or killed with their driver) have no verdict yet; KILLED: ended early (diverged, stopped).
SHOWN = ("FINISHED", "FAILED", "KILLED")
MARKERS = "osD^v<>ph*"
DODGE = 0.04  # log2 units between the points of neighbouring norms at one batch, where there are error bars
# Settings every trial of a sweep shares (unless the grid sweeps them): the document's "every trial" line.
SETUP_KEYS = (
    "model.backbone",
    "train.crop",
    "train.epochs",
    "train.budget",
    "train.steps_per_epoch",
    "train.lr",
    "train.lr_reference_batch",  # with it, train.lr is for that many images per step and scales
    "train.loss",
    "resources.workers_per_trial",
)


Facet = tuple[str, tuple[int, ...], str]  # backbone, crop, train.budget: one panel of the figure


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
    status: str  # FINISHED | FAILED | DIVERGED | STOPPED (tracking.OUTCOMES)
    failure: str | None  # why it failed, diverged or was stopped
    seed: int | None = None
    config: tuple[tuple[str, str], ...] = ()  # every param but train.seed: equal for the seeds of one setup
    duration_s: float | None = None  # the run's start to end
    last_gain: float | None = None  # val mIoU of the last epoch less the one before
    budget: str = "epochs"  # train.budget: what the trial's protocol held equal
    key: str = ""  # the trial's key, `norm=bn,train.batch_per_gpu=2` (its run's tag)

    @property
    def facet(self) -> Facet:
        return self.backbone, self.crop, self.budget

    @property
    def still_improving(self) -> bool:
        """A finished trial whose last epoch gained more than STILL_IMPROVING: not converged."""
        return self.status == "FINISHED" and self.last_gain is not None and self.last_gain > STILL_IMPROVING

    @property
    def crop_text(self) -> str:
        return _crop_text(self.crop)

    @property
    def config_name(self) -> str:
        """The trial's key without its seed: the name of its configuration (a run's name is the swept
        values alone, `0 bn 1`, which cannot tell the seed's apart)."""
        parts = [p for p in (self.key or self.name).split(",") if not p.startswith(f"{SEED}=")]
        return ",".join(parts) or "base"


@dataclass(frozen=True)
class Configuration:
    """The trials of one configuration (they differ only in train.seed): one point of the figure."""

    trials: tuple[TrialRow, ...]

    @property
    def first(self) -> TrialRow:
        return self.trials[0]

    @property
    def values(self) -> list[float]:
        """Best val mIoU of each finished seed."""
        return [
            t.best_val_miou for t in self.trials if t.status == "FINISHED" and t.best_val_miou is not None
        ]

    @property
    def mean(self) -> float | None:
        return _mean(self.values)

    @property
    def low(self) -> float | None:
        return min(self.values, default=None)

    @property
    def high(self) -> float | None:
        return max(self.values, default=None)

    @property
    def improving(self) -> bool:
        """A finished seed was still improving at its end."""
        return any(t.still_improving for t in self.trials)

    @property
    def mean_official(self) -> float | None:
        return _mean(t.best_official for t in self.trials if t.status == "FINISHED")

    @property
    def mean_duration_s(self) -> float | None:
        return _mean(t.duration_s for t in self.trials)


def _mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


@dataclass(frozen=True)
class EnsembleSummary:
    """The latest ensemble run of the experiment, with its members scored in the same pass."""

    run_id: str
    name: str
    combine: str
    miou: float | None
    members: tuple[tuple[str, str, float | None], ...]  # (run id, name, val mIoU in the ensemble's pass)
    outside: int  # members that are not trials of the reported sweep
    command: str | None

    @property
    def best_member(self) -> tuple[str, str, float] | None:
        scored = [(i, n, v) for i, n, v in self.members if v is not None]
        return max(scored, key=lambda m: m[2], default=None)

    @property
    def gain(self) -> float | None:
        best = self.best_member
        return None if best is None or self.miou is None else self.miou - best[2]


@dataclass(frozen=True)
class ReportResult:
    experiment: str
    sweep_run_id: str
    rows: list[TrialRow]  # sorted by backbone, crop, norm, batch per GPU, configuration, seed
    figure: Path
    table: Path  # the markdown document
    configurations: list[Configuration]
    ensemble: EnsembleSummary | None
    commands: list[str]  # the fenced block of the document, in order: sweep, ensemble, report


def build_report(
    experiment: str | None,
    out_dir: Path,
    uri: str | None = None,
    sweep_run_id: str | None = None,
    *,
    doc: Path | None = None,
    command: str | None = None,
    baselines: Sequence[str] = (BASELINE,),
) -> ReportResult:
    """Figure and document of one sweep's trials, written to out_dir (report.png, report.md) or, with
    `doc`, to that markdown path with the figure beside it (same name, .png), and logged to the sweep's run.
    `command` is the command line of this report, printed with those of the sweep and the ensemble.
    Every norm is compared with each of `baselines` at each batch per GPU (UsageError: one no trial ran).

    The sweep is sweep_run_id, else the latest sweep of `experiment`, else the latest sweep anywhere.
    Raises LookupError (one line) when there is no such experiment or sweep run, or it has no trials."""
    if doc is not None and doc.suffix.lower() != ".md":
        raise UsageError(f"--doc {doc}: give a markdown path ending in .md (the figure goes beside it)")
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
    ran = sorted({r.norm for r in rows})
    for norm in baselines:
        if norm not in ran:
            raise UsageError(f"--baseline {norm!r}: no trial of this sweep ran it; allowed: {', '.join(ran)}")
    ensemble = ensemble_summary(sweep, uri)
    commands = command_lines(sweep, ensemble, command)
    figure_path, table_path = (
        (doc.with_suffix(".png"), doc) if doc else (out_dir / "report.png", out_dir / "report.md")
    )
    table_path.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, title=f"{experiment} (sweep run {sweep_id[:8]})").savefig(figure_path, dpi=100)
    configs = configurations(rows)
    compared = differences(configs, uri, baselines)
    table_path.write_text(markdown(rows, experiment, sweep, figure_path.name, ensemble, commands, compared))
    tracking.log_files(sweep_id, [figure_path, table_path], ARTIFACT_DIR, uri)
    return ReportResult(experiment, sweep_id, rows, figure_path, table_path, configs, ensemble, commands)


def trial_rows(sweep: Run, uri: str | None = None) -> list[TrialRow]:
    runs = tracking.trial_runs(sweep.info.experiment_id, sweep.info.run_id, uri)
    rows = [_row(run, uri) for run in runs if run.info.status in SHOWN]
    return sorted(rows, key=_order)


def configurations(rows: list[TrialRow]) -> list[Configuration]:
    """The rows grouped by everything but their seed, in the rows' order."""
    groups: dict[tuple, list[TrialRow]] = {}
    for r in rows:
        groups.setdefault(r.config or (("run", r.run_id),), []).append(r)
    return [Configuration(tuple(sorted(g, key=_order))) for g in groups.values()]


def ensemble_summary(sweep: Run, uri: str | None = None) -> EnsembleSummary | None:
    """The latest finished ensemble run of the sweep's experiment (None: there is none); its members'
    scores are those of the ensemble's own pass (same split, same inference settings)."""
    run = tracking.latest_ensemble_run(sweep.info.experiment_id, uri)
    if run is None:
        return None
    params, metrics = run.data.params, run.data.metrics
    ids = [
        i for i in (params.get("members") or run.data.tags.get("orchestrator.members", "")).split(",") if i
    ]
    members, outside = [], 0
    for i, run_id in enumerate(ids):
        member = tracking.find_run(run_id, uri)
        outside += member is None or member.data.tags.get(tracking.PARENT) != sweep.info.run_id
        # The trial's key names it in full; its run's name is the swept values alone (`bn 2 0`).
        name = (member.data.tags.get(tracking.TRIAL_KEY) or member.info.run_name) if member else run_id[:8]
        members.append((run_id, name, metrics.get(f"member{i}_val_miou")))
    return EnsembleSummary(
        run.info.run_id,
        run.info.run_name,
        params.get("combine", "mean"),
        metrics.get(METRIC),
        tuple(members),
        outside,
        run.data.tags.get(tracking.COMMAND),
    )


def command_lines(sweep: Run, ensemble: EnsembleSummary | None, report_command: str | None) -> list[str]:
    """The command lines that made the sweep, the ensemble and this report, in that order; a run that did
    not record its own (made before commands were tagged, or by a library call) gets a comment instead."""
    lines = [
        sweep.data.tags.get(tracking.COMMAND) or f"# sweep run {sweep.info.run_id}: command not recorded"
    ]
    if ensemble:
        lines.append(ensemble.command or f"# ensemble run {ensemble.run_id}: command not recorded")
    return lines + ([report_command] if report_command else [])


def plot(rows: list[TrialRow], title: str = "") -> Figure:
    """Facets backbone x crop (all that have a trial, an empty one says so), shared y; failed trials and
    trials without a val_miou are left out. A point is the mean over a configuration's seeds, with a bar
    from their min to their max where there are several. The x axis runs from large to small batches, as
    in the paper."""
    backbones = sorted({r.backbone for r in rows})
    columns = sorted({(r.crop, r.budget) for r in rows})
    norms = sorted({r.norm for r in rows})
    cmap = colormaps["tab10" if len(norms) <= 10 else "tab20"]
    style = {n: {"color": cmap(i), "marker": MARKERS[i % len(MARKERS)]} for i, n in enumerate(norms)}
    points = facet_points(configurations(rows))
    batches = sorted({r.batch_per_gpu for r in rows if r.batch_per_gpu}) or [1]
    seeded = any(
        len(c.values) > 1 for facet in points.values() for line in facet.values() for c in line.values()
    )

    fig = Figure(figsize=(2.6 + 4.0 * len(columns), 1.0 + 3.4 * len(backbones)), layout="constrained")
    axes = fig.subplots(len(backbones), len(columns), sharex=True, sharey=True, squeeze=False)
    for ax_row, backbone in zip(axes, backbones, strict=True):
        for ax, (crop, budget) in zip(ax_row, columns, strict=True):
            facet = points.get((backbone, crop, budget), {})
            for norm, line in sorted(facet.items()):
                xs = sorted(line)
                means = [line[x].mean for x in xs]
                # With error bars, each norm's points sit a little aside (log scale: a factor), so that
                # the bars of a batch do not hide one another.
                shift = 2 ** (DODGE * (norms.index(norm) - (len(norms) - 1) / 2)) if seeded else 1
                ax.plot([x * shift for x in xs], means, label=norm, **style[norm])
                spread = [(x, line[x]) for x in xs if len(line[x].values) > 1]
                if spread:  # no caps: the bars stay out of ax.lines, which are the norms' lines
                    ax.errorbar(
                        [x * shift for x, _ in spread],
                        [c.mean for _, c in spread],
                        yerr=[[c.mean - c.low for _, c in spread], [c.high - c.mean for _, c in spread]],
                        fmt="none",
                        ecolor=style[norm]["color"],
                        elinewidth=1.5,
                        capsize=0,
                    )
            if not facet:
                ax.text(0.5, 0.5, "no finished trials", transform=ax.transAxes, ha="center", color="gray")
            ax.set_title(_facet_title((backbone, crop, budget)), fontsize="medium")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, labels=[str(b) for b in batches])
            ax.minorticks_off()
            ax.set_xlim(max(batches) * 1.3, min(batches) / 1.3)  # decreasing, as GN's Figure 1
            ax.grid(alpha=0.3)
    fig.supxlabel("batch size (images per GPU)")
    fig.supylabel("best val mIoU")
    if title:
        fig.suptitle(title)
    plotted = sorted({norm for facet in points.values() for norm in facet})
    if plotted:
        handles = [Line2D([], [], label=n, **style[n]) for n in plotted]
        legend = "norm\n(mean over seeds,\nbars: min..max)" if seeded else "norm"
        fig.legend(handles=handles, title=legend, loc="outside right upper")
    return fig


Points = dict[Facet, dict[str, dict[int, Configuration]]]


def facet_points(configs: list[Configuration]) -> Points:
    """{facet: {norm: {batch per GPU: configuration}}} over configurations with a finished
    seed. Other grid keys (lr, ...) can give several configurations per point: the point is the one with
    the best mean."""
    points: Points = {}
    for c in configs:
        t = c.first
        if c.mean is None or not t.batch_per_gpu:
            continue
        line = points.setdefault(t.facet, {}).setdefault(t.norm, {})
        if t.batch_per_gpu not in line or c.mean > line[t.batch_per_gpu].mean:
            line[t.batch_per_gpu] = c
    return points


@dataclass(frozen=True)
class Compared:
    """One difference the figure shows: configuration `a` less `b`, in one facet; its bootstrap interval,
    or None where a side has no per-image matrices to resample."""

    facet: Facet
    what: str  # "gn:c16 - bn at 1/GPU", "gn:c16 at 1/GPU - at 8/GPU"
    a: Configuration
    b: Configuration
    difference: Difference | None


def differences(
    configs: list[Configuration], uri: str | None = None, baselines: Sequence[str] = (BASELINE,)
) -> list[Compared]:
    """The comparisons the figure makes, per facet: every norm against each of `baselines` at each batch
    per GPU (a pair once: an earlier baseline is not compared again with a later one), and every norm at
    each batch against itself at its largest (is it flat in the batch?)."""
    points, matrices = facet_points(configs), _Matrices(uri)
    compared = []
    for facet, lines in sorted(points.items()):
        pairs = []
        for i, baseline in enumerate(baselines):
            base = lines.get(baseline, {})
            for norm, line in sorted(lines.items()):
                if norm == baseline or norm in baselines[:i]:
                    continue
                pairs += [
                    (f"{norm} - {baseline} at {b}/GPU", c, base[b])
                    for b, c in sorted(line.items())
                    if b in base
                ]
        for norm, line in sorted(lines.items()):
            top = max(line)
            pairs += [
                (f"{norm} at {b}/GPU - at {top}/GPU", line[b], line[top]) for b in sorted(line) if b != top
            ]
        for what, a, b in pairs:
            ma, mb = matrices.of(a), matrices.of(b)
            fits = ma is not None and mb is not None and ma.shape[1:] == mb.shape[1:]
            compared.append(Compared(facet, what, a, b, paired_difference(ma, mb) if fits else None))
    return compared


class _Matrices:
    """Each configuration's finished seeds' per-image confusion matrices [S, N, C, C], read once; None
    where a seed logged none or the seeds' splits differ."""

    def __init__(self, uri: str | None) -> None:
        self._uri, self._read = uri, {}

    def of(self, c: Configuration) -> torch.Tensor | None:
        key = tuple(t.run_id for t in c.trials)
        if key not in self._read:
            finished = [t.run_id for t in c.trials if t.status == "FINISHED"]
            seeds = [tracking.per_image_confusion(run_id, self._uri) for run_id in finished]
            same = seeds and all(m is not None and m.shape == seeds[0].shape for m in seeds)
            self._read[key] = torch.from_numpy(np.stack(seeds)) if same else None
        return self._read[key]


def markdown(
    rows: list[TrialRow],
    experiment: str,
    sweep: Run,
    figure_name: str = "report.png",
    ensemble: EnsembleSummary | None = None,
    commands: list[str] | None = None,
    compared: list[Compared] | None = None,
) -> str:
    configs = configurations(rows)
    seeds = sorted({len(c.trials) for c in configs})
    lines = [
        f"# Normalization study: {sweep.info.run_name}",
        "",
        f"- experiment: `{experiment}`",
        f"- sweep run: `{sweep.info.run_id}` ({sweep.info.status})",
        *_setup(sweep),
        f"- trials: {len(rows)} ({how_ended(rows, every=True)}) in {len(configs)} "
        f"configurations of {'/'.join(map(str, seeds))} seed(s)",
        f"- {_protocol_line(rows)}",
        f"- {_improving_line(rows)}",
        f"- wall time of the sweep: {_wall_time(sweep)}",
        f"- trial durations: {_durations(rows)}",
        f"- ensemble: {_ensemble_line(ensemble, experiment)}",
        f"- made: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "Commands (the sweep, the ensemble, this document):",
        "",
        "```bash",
        *(commands or []),
        "```",
        "",
        f"![best val mIoU against batch per GPU]({figure_name})",
        "",
    ]
    lines += _norm_by_batch(configs)
    lines += _findings(compared or [])
    lines += _configuration_table(configs)
    if ensemble:
        lines += _ensemble_table(ensemble)
    lines += _trial_table(rows)
    return "\n".join(lines).rstrip("\n") + "\n"


def _setup(sweep: Run) -> list[str]:
    params = sweep.data.params
    grid = {k.removeprefix("grid."): v for k, v in sorted(params.items()) if k.startswith("grid.")}
    shared = [f"{k} {params[k]}" for k in SETUP_KEYS if params.get(k, "None") != "None" and k not in grid]
    lines = [f"- grid: {' x '.join(f'{k} {v}' for k, v in grid.items())}"] if grid else []
    return lines + ([f"- every trial: {', '.join(shared)}"] if shared else [])


def _norm_by_batch(configs: list[Configuration]) -> list[str]:
    """One table per facet: a row per norm, a column per batch per GPU, the figure's points as numbers; a
    point no trial finished says how its trials ended (diverged: the norm collapsed there)."""
    points = facet_points(configs)
    if not points:
        return []
    unscored = {
        (c.first.facet, c.first.norm, c.first.batch_per_gpu): how_ended(list(c.trials))
        for c in configs
        if c.mean is None
    }
    lines = [
        "## Best val mIoU by norm and batch per GPU",
        "",
        "Mean over seeds (min..max where there are several); `*`: a seed still improving at its end.",
        "",
    ]
    for key, facet in sorted(points.items()):
        ended = {(n, b) for f, n, b in unscored if f == key and b}
        batches = sorted({b for line in facet.values() for b in line} | {b for _, b in ended})
        lines += [f"### {_facet_title(key)}", ""]
        lines += [_cells(["norm", *(f"{b}/GPU" for b in batches)]), _cells(["---"] * (len(batches) + 1))]
        for norm in sorted(set(facet) | {n for n, _ in ended}):
            line = facet.get(norm, {})
            cells = [_point(line[b]) if b in line else unscored.get((key, norm, b), "-") for b in batches]
            lines.append(_cells([norm, *cells]))
        lines.append("")
    return lines


def _findings(compared: list[Compared]) -> list[str]:
    """Per facet, each difference of the figure in points of mIoU with its 95% interval, and in words
    whether it is a finding."""
    if not compared:
        return []
    lines = [
        "## Which differences are findings",
        "",
        f"mIoU of the first less the second, in points, with a {LEVEL:.0%} interval from a paired bootstrap "
        f"({RESAMPLES} resamples) over the validation images (one draw for both sides) and over the seeds "
        "(each side its own draw). A difference is a finding when its interval excludes 0; else the two "
        "cannot be told apart by these trials.",
        "",
    ]
    for facet in sorted({c.facet for c in compared}):
        rows = [c for c in compared if c.facet == facet]
        found = [c for c in rows if c.difference and c.difference.finding]
        unknown = sum(c.difference is None for c in rows)
        unconverged = sum(c.a.improving or c.b.improving for c in found)
        lines += [f"### {_facet_title(facet)}", ""]
        lines.append(
            f"{len(found)} of {len(rows)} differences are findings"
            + (f", {unconverged} of them resting on trials still improving" if unconverged else "")
            + (f"; {unknown} cannot be tested (a trial logged no per-image scores)" if unknown else "")
            + "."
        )
        head = ["comparison", "difference", "95% interval", "finding?", "converged?"]
        lines += ["", _cells(head), _cells(["---"] * len(head))]
        for c in rows:
            d = c.difference
            if d is None:
                cells = [_points(c.a.mean - c.b.mean), "-", "untested: no per-image scores"]
            else:
                verdict = "yes" if d.finding else "no: the interval holds 0"
                cells = [_points(d.estimate), f"{_points(d.low)} .. {_points(d.high)}", verdict]
            converged = "no: a seed still improving" if c.a.improving or c.b.improving else "yes"
            lines.append(_cells([c.what, *cells, converged]))
        lines.append("")
    return lines


def _points(miou: float) -> str:
    return f"{100 * miou:+.1f}"


def _configuration_table(configs: list[Configuration]) -> list[str]:
    official = any(c.mean_official is not None for c in configs)
    head = [
        "configuration",
        "backbone",
        "norm",
        "batch/GPU",
        "crop",
        "seeds",
        "best val mIoU, mean",
        "min..max",
    ]
    head += ["best official mIoU, mean"] if official else []
    head += ["duration, mean"]
    lines = [
        "## Configurations",
        "",
        "Trials that differ only in `train.seed`; seeds: finished (and how the others ended). Only finished "
        "trials make the means: a diverged or stopped one is no score of its configuration.",
        "",
    ]
    lines += [_cells(head), _cells(["---"] * len(head))]
    for c in configs:
        t, others = c.first, how_ended([r for r in c.trials if r.status != "FINISHED"])
        cells = [t.config_name, t.backbone, t.norm, _text(t.batch_per_gpu), t.crop_text]
        cells += [f"{len(c.values)}" + (f" ({others})" if others else ""), _text(c.mean), _range(c)]
        cells += [_text(c.mean_official)] if official else []
        cells += [_duration(c.mean_duration_s)]
        lines.append(_cells(cells))
    return lines + [""]


def _ensemble_table(e: EnsembleSummary) -> list[str]:
    lines = [
        "## Ensemble",
        "",
        f"Run `{e.run_id}` ({e.name}, combine: {e.combine}); members and ensemble scored in the same pass.",
        "",
        _cells(["model", "run", "val mIoU"]),
        _cells(["---"] * 3),
    ]
    lines += [_cells([name, run_id[:8], _text(v)]) for run_id, name, v in e.members]
    lines.append(_cells([f"ensemble ({e.combine})", e.run_id[:8], _text(e.miou)]))
    return lines + [""]


def _trial_table(rows: list[TrialRow]) -> list[str]:
    official = any(r.best_official is not None for r in rows)
    head = ["trial", "run", "backbone", "norm", "batch/GPU", "crop", "seed", "best val mIoU"]
    head += ["best official mIoU"] if official else []
    head += ["last epoch", "last-epoch gain", "duration", "status", "why it ended"]
    lines = ["## Trials", "", _cells(head), _cells(["---"] * len(head))]
    for r in rows:
        cells = [r.name, r.run_id[:8], r.backbone, r.norm, _text(r.batch_per_gpu), r.crop_text, _text(r.seed)]
        cells += [_text(r.best_val_miou)] + ([_text(r.best_official)] if official else [])
        gain = (
            "-"
            if r.last_gain is None
            else f"{r.last_gain:+.4f}" + (" (improving)" if r.still_improving else "")
        )
        cells += [_text(r.last_epoch), gain, _duration(r.duration_s), r.status, _text(r.failure)]
        lines.append(_cells(cells))
    return lines


def how_ended(rows: list[TrialRow], every: bool = False) -> str:
    """How the rows' trials ended, counted ("3 finished, 1 diverged"); `every`: finished and failed are
    counted even at 0."""
    counts = Counter(r.status.lower() for r in rows)
    shown = [o for o in tracking.OUTCOMES if counts[o] or (every and o in ("finished", "failed"))]
    return ", ".join(f"{counts[o]} {o}" for o in shown)


def _wall_time(sweep: Run) -> str:
    start, end = sweep.info.start_time, sweep.info.end_time
    begun = _utc(start)
    if sweep.info.status == "RUNNING" or not end:
        so_far = _duration(dt.datetime.now(dt.timezone.utc).timestamp() - start / 1000)
        return f"not ended: still running, or its driver died (started {begun}, {so_far} ago)"
    return f"{_duration((end - start) / 1000)} ({begun} to {_utc(end)})"


def _durations(rows: list[TrialRow]) -> str:
    values = [r.duration_s for r in rows if r.duration_s is not None]
    if not values:
        return "-"
    return (
        f"{_duration(sum(values))} in all; per trial {_duration(statistics.fmean(values))} on average, "
        f"{_duration(min(values))} to {_duration(max(values))}"
    )


def _ensemble_line(e: EnsembleSummary | None, experiment: str) -> str:
    if e is None:
        return f"none in experiment `{experiment}` (`orchestrator ensemble --top 3` makes one)"
    best, text = e.best_member, f"val mIoU {_text(e.miou)}"
    if best and e.gain is not None:
        text += f", best member {best[2]:.4f} (`{best[1]}`), gain {e.gain:+.4f}"
    text += f" (run `{e.run_id}`, {len(e.members)} members, {e.combine})"
    if e.outside:
        text += f"; {e.outside} of its members are not trials of this sweep"
    return text


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
    params, info = run.data.params, run.info
    history = (
        tracking.metric_history(info.run_id, METRIC, uri)
        if METRIC in run.data.metrics
        else tracking.MetricHistory(None, None, None)
    )
    return TrialRow(
        run_id=info.run_id,
        name=info.run_name or run.data.tags.get(tracking.TRIAL_KEY, ""),
        backbone=params.get("model.backbone", "?"),
        norm=params.get("norm", "?"),
        batch_per_gpu=_int(params.get("train.batch_per_gpu", "")),
        crop=tracking.crop_param(params),
        best_val_miou=history.best,
        best_official=_best(run, OFFICIAL, uri),
        last_epoch=history.last_step,
        last_gain=history.last_gain,
        status=tracking.outcome(run).upper(),
        failure=run.data.tags.get(tracking.FAILURE) or run.data.tags.get(tracking.ENDED_EARLY),
        seed=_int(params.get(SEED, "")),
        config=tuple(sorted((k, v) for k, v in params.items() if k != SEED)),
        duration_s=(info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None,
        budget=params.get("train.budget", "epochs"),
        key=run.data.tags.get(tracking.TRIAL_KEY, ""),
    )


def _order(r: TrialRow) -> tuple:
    return (
        r.backbone,
        r.crop,
        r.budget,
        r.norm,
        r.batch_per_gpu or math.inf,
        r.config_name,
        _none_last(r.seed),
        r.name,
    )


def _none_last(value: int | None) -> float:
    return math.inf if value is None else value


def _int(text: str) -> int | None:
    return int(text) if text.lstrip("-").isdecimal() else None


def _best(run: Run, key: str, uri: str | None) -> float | None:
    if key not in run.data.metrics:  # saves a query per trial that never logged it
        return None
    return tracking.best_value(run.info.run_id, key, uri)


def _point(c: Configuration) -> str:
    return _text(c.mean) + (f" ({_range(c)})" if len(c.values) > 1 else "") + ("*" if c.improving else "")


def _improving_line(rows: list[TrialRow]) -> str:
    finished = [r for r in rows if r.status == "FINISHED"]
    improving = sum(r.still_improving for r in finished)
    unconverged = ": their scores are not converged, and what rests on them may change with a longer budget"
    return (
        f"still improving at their end: {improving or 'none'} of {len(finished)} finished trials "
        f"(val mIoU up more than {100 * STILL_IMPROVING:.1f} points in the last epoch)"
        + (unconverged if improving else "")
    )


def _range(c: Configuration) -> str:
    return f"{c.low:.4f}..{c.high:.4f}" if len(c.values) > 1 else "-"


def _facet_title(facet: Facet) -> str:
    backbone, crop, budget = facet
    return f"{backbone}, crop {_crop_text(crop)}, {Budget.parse(budget).protocol}"


def _protocol_line(rows: list[TrialRow]) -> str:
    """What the trials' budgets held equal, in words: the protocol the comparisons are made under."""
    budgets = [Budget.parse(b) for b in sorted({r.budget for r in rows}, key=lambda b: (b != "epochs", b))]
    said = [f"{b.protocol}: {b.meaning}" for b in budgets]
    if len(said) == 1:
        return f"protocol: {said[0]}"
    return "protocols (each its own panel and tables, compared within): " + "; ".join(said)


def _crop_text(crop: tuple[int, ...]) -> str:
    return "x".join(map(str, crop)) or "?"


def _utc(ms: int) -> str:
    return f"{dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc):%Y-%m-%d %H:%M} UTC"


def _duration(seconds: float | None) -> str:
    """1h 02m 03s, 4m 05s, 6s."""
    if seconds is None:
        return "-"
    s = round(seconds)
    h, m = s // 3600, s % 3600 // 60
    if h:
        return f"{h}h {m:02d}m {s % 60:02d}s"
    return f"{m}m {s % 60:02d}s" if m else f"{s}s"


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(str(value).split())  # one table row: no newlines
    return text if len(text) <= 200 else text[:197] + "..."


def _cells(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
