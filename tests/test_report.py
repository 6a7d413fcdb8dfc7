"""`orchestrator report` on a real SQLite MLflow store, written the way sweeps write it (no Ray)."""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.colors
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator import metrics, report, tracking
from orchestrator.cli import main
from orchestrator.errors import UsageError
from orchestrator.inference.runs import run_ensemble

NAN = math.nan
# backbone, norm, batch per GPU, crop, val_miou per epoch, val_miou_official per epoch, failure reason.
# Not in report order, so that the sort is tested.
TRIALS = [
    ("resnet50", "gn:g8", 2, [64, 64], [0.20], None, "non-finite loss at step 12 (lr=0.02 | amp=bf16)"),
    ("resnet18", "gn:g8", 2, [64, 64], [NAN, 0.49, 0.41], None, None),
    ("resnet18", "bn", 2, [128, 64], [0.55, 0.52], None, None),
    ("resnet18", "bn", 1, [64, 64], [0.30, 0.42, 0.40], None, None),
    ("resnet50", "gn:g8", 16, [64, 64], [0.33, 0.38], None, None),
    ("resnet18", "gn:g8", 1, [64, 64], [0.40, 0.48, 0.47], [0.70, 0.80, 0.75], None),
    ("resnet18", "bn", 2, [64, 64], [0.35, 0.50, 0.45], None, None),
]
# (backbone, crop, norm, batch) -> best val_miou, in report order.
EXPECTED = {
    ("resnet18", "64x64", "bn", 1): 0.42,
    ("resnet18", "64x64", "bn", 2): 0.50,
    ("resnet18", "64x64", "gn:g8", 1): 0.48,
    ("resnet18", "64x64", "gn:g8", 2): 0.49,
    ("resnet18", "128x64", "bn", 2): 0.55,
    ("resnet50", "64x64", "gn:g8", 2): 0.20,
    ("resnet50", "64x64", "gn:g8", 16): 0.38,
}
DAY_MS = 24 * 3600 * 1000


@dataclass
class Store:
    uri: str
    sweep: str  # the latest sweep of "study"
    old_sweep: str  # an earlier sweep of "study", one trial
    idle_sweep: str  # the only sweep of "idle", whose one trial is still running
    trial: str  # a trial run of the latest sweep


def _trial(exp: str, sweep: str, uri: str, trial: tuple, running: bool = False) -> str:
    """A trial run as a sweep writes it: tags and params at the start, an epoch at a time, the verdict."""
    backbone, norm, batch, crop, history, official, reason = trial
    params = {"model.backbone": backbone, "norm": norm, "train.batch_per_gpu": batch, "train.crop": crop}
    key = f"model.backbone={backbone},norm={norm},train.batch_per_gpu={batch},train.crop={crop[0]}x{crop[1]}"
    run_id = tracking.start_trial_run(exp, sweep, key, {**params, "train.lr": 0.01}, uri)
    for epoch, value in enumerate(history, 1):
        extra = {"val_miou_official": official[epoch - 1]} if official else {}
        tracking.log_epoch(
            run_id, {"epoch": epoch, "val_miou": value, "train_loss": 1 / epoch, **extra}, epoch, uri
        )
    if not running:
        tracking.end_run(run_id, uri, failed=bool(reason), reason=reason)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri)
    exp, idle = (c.create_experiment(n, artifact_location=(root / n).as_uri()) for n in ("study", "idle"))
    c.create_experiment("empty", artifact_location=(root / "empty").as_uri())
    now = int(time.time() * 1000)
    old, idle_sweep = (
        c.create_run(e, start_time=now - DAY_MS, run_name="study", tags={tracking.KIND: "sweep"}).info.run_id
        for e in (exp, idle)
    )
    _trial(exp, old, uri, ("resnet101", "bn", 8, [64, 64], [0.6], None, None))
    _trial(idle, idle_sweep, uri, ("resnet18", "bn", 1, [64, 64], [0.1], None, None), running=True)
    sweep = tracking.start_sweep_run(exp, "study", {"name": "study"}, uri)
    trial = [_trial(exp, sweep, uri, t) for t in TRIALS][-1]
    _trial(exp, sweep, uri, ("resnet50", "bn", 4, [128, 64], [0.3], None, None), running=True)
    tracking.end_run(sweep, uri, failed=True)
    return Store(uri, sweep, old, idle_sweep, trial)


@pytest.fixture(scope="module")
def result(store: Store, tmp_path_factory: pytest.TempPathFactory) -> report.ReportResult:
    return report.build_report("study", tmp_path_factory.mktemp("report"), uri=store.uri)


def _table(md: str, heading: str = "## Trials") -> list[list[str]]:
    """The rows of the first markdown table after `heading` (header first, rule left out) as lists of
    cells, pipes unescaped."""
    after = md.split(f"\n{heading}\n", 1)[1]
    table = next(b.strip() for b in after.split("\n\n") if b.strip().startswith("|"))
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.splitlines()]
    return [
        [c.strip().replace("\\|", "|") for c in row] for row in rows if not row[0].strip().startswith("---")
    ]


def test_rows_are_the_latest_sweeps_finished_and_failed_trials_sorted_with_best_values(store, result):
    assert result.experiment == "study" and result.sweep_run_id == store.sweep
    got = {(r.backbone, r.crop_text, r.norm, r.batch_per_gpu): r.best_val_miou for r in result.rows}
    assert list(got) == list(EXPECTED)  # the old sweep's and the running trial are not in it; sorted
    assert got == pytest.approx(EXPECTED)  # max of each history, the NaN epoch ignored
    assert [r.last_epoch for r in result.rows] == [3, 3, 3, 3, 2, 1, 2]
    (failed,) = [r for r in result.rows if r.status == "FAILED"]
    assert (failed.backbone, failed.batch_per_gpu) == ("resnet50", 2)
    assert failed.failure == "non-finite loss at step 12 (lr=0.02 | amp=bf16)"
    assert [r.best_official for r in result.rows if r.best_official] == [pytest.approx(0.80)]


def test_markdown_table_lists_every_trial_with_its_failure_reason(store, result):
    md = result.table.read_text()
    assert f"- sweep run: `{store.sweep}` (FAILED)" in md and "- experiment: `study`" in md
    assert "- trials: 7 (6 finished, 1 failed) in 7 configurations of 1 seed(s)" in md
    head, *rows = _table(md)
    assert head == ["trial", "run", "backbone", "norm", "batch/GPU", "crop", "seed", "best val mIoU",
                    "best official mIoU", "last epoch", "last-epoch gain", "duration", "status",
                    "why it ended"]  # fmt: skip
    assert len(rows) == len(EXPECTED)
    assert [(r[2], r[5], r[3], int(r[4])) for r in rows] == list(EXPECTED)
    assert [float(r[7]) for r in rows] == pytest.approx(list(EXPECTED.values()))
    assert [r[8] for r in rows] == ["-", "-", "0.8000", "-", "-", "-", "-"]
    assert {r[6] for r in rows} == {"-"}  # no train.seed param
    failed = rows.pop(-2)
    assert failed[12:] == ["FAILED", "non-finite loss at step 12 (lr=0.02 | amp=bf16)"]
    assert {r[12] for r in rows} == {"FINISHED"} and {r[13] for r in rows} == {"-"}
    assert rows[0][0] == "model.backbone=resnet18,norm=bn,train.batch_per_gpu=1,train.crop=64x64"


def test_diverged_and_stopped_trials_show_as_such_and_never_as_finished(tmp_path, monkeypatch):
    """A trial the divergence guard or a scheduler ended is KILLED in MLflow with its outcome tagged: the
    report names the outcome and the reason, and leaves it out of every mean."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = MlflowClient(uri).create_experiment("screen", artifact_location=(tmp_path / "a").as_uri())
    sweep = tracking.start_sweep_run(exp, "screen", {"name": "screen"}, uri)
    ended = {}
    for norm, batch, history, outcome in [
        ("bn", 2, [0.40, 0.45], None),
        ("gn:g8", 2, [0.25, 0.25], ("diverged", "validation predicted a single class ... epoch 2")),
        ("bn", 1, [0.30], ("stopped", "stopped by asha after epoch 1 (val_miou 0.3000)")),
        ("gn:g8", 1, [0.20], ("diverged", "loss nan at 3 steps in a row, the last at epoch 1 step 4")),
    ]:
        run_id = _trial(exp, sweep, uri, ("resnet18", norm, batch, [64, 64], history, None, None), True)
        if outcome:
            tracking.end_early(run_id, *outcome, uri)
        ended[(norm, batch)] = tracking.end_trial_run(run_id, uri)
    tracking.end_run(sweep, uri)
    assert ended[("bn", 2)] == ("finished", None)
    assert ended[("bn", 1)] == ("stopped", "stopped by asha after epoch 1 (val_miou 0.3000)")
    runs = tracking.trial_runs(exp, sweep, uri)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    assert tracking.finished_trial_runs("screen", uri)[0].data.params["norm"] == "bn"  # ensemble's pool
    assert tracking.ended_early("screen", uri) == {"diverged": 2, "stopped": 1}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(LookupError, match=r"checkpoint .*; not candidates: 2 diverged, 1 stopped trial\(s\)"):
        run_ensemble("screen", top=2)

    md = report.build_report("screen", tmp_path / "report", uri=uri).table.read_text()
    assert "- trials: 4 (1 finished, 0 failed, 2 diverged, 1 stopped) in 4 configurations" in md
    rows = {(r[3], r[4]): r for r in _table(md)[1:]}
    assert rows[("bn", "1")][-2:] == ["STOPPED", "stopped by asha after epoch 1 (val_miou 0.3000)"]
    assert rows[("gn:g8", "2")][-2] == "DIVERGED" and rows[("bn", "2")][-2] == "FINISHED"
    # The norm-by-batch table: a point no trial finished says how its trials ended, not a score.
    assert _table(md, "### resnet18, crop 64x64, epochs-equal")[1:] == [
        ["bn", "1 stopped", "0.4500*"],
        ["gn:g8", "1 diverged", "1 diverged"],
    ]  # fmt: skip (bn at 2 rose 0.05 in its last epoch: still improving)
    configs = {(r[2], r[3]): r for r in _table(md, "## Configurations")[1:]}
    assert configs[("gn:g8", "2")][5:7] == ["0 (1 diverged)", "-"]


def test_figure_has_a_facet_per_backbone_and_crop_and_a_line_per_norm(result):
    fig = report.plot(result.rows)
    assert [ax.get_title() for ax in fig.axes] == [
        "resnet18, crop 64x64, epochs-equal", "resnet18, crop 128x64, epochs-equal",
        "resnet50, crop 64x64, epochs-equal", "resnet50, crop 128x64, epochs-equal",
    ]  # fmt: skip
    lines = [
        {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines} for ax in fig.axes
    ]
    assert lines[0] == {"bn": ([1, 2], [0.42, 0.50]), "gn:g8": ([1, 2], [0.48, 0.49])}
    assert lines[1] == {"bn": ([2], [0.55])}
    assert lines[2] == {"gn:g8": ([16], [0.38])}  # the failed batch-2 trial is left out
    assert lines[3] == {} and [t.get_text() for t in fig.axes[3].texts] == ["no finished trials"]
    colour = {(i, ln.get_label()): ln.get_color() for i, ax in enumerate(fig.axes) for ln in ax.lines}
    assert colour[0, "bn"] == colour[1, "bn"] != colour[0, "gn:g8"] == colour[2, "gn:g8"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["bn", "gn:g8"]
    left, right = fig.axes[0].get_xlim()
    assert left > 16 > 1 > right  # large batches on the left, as in GN's Figure 1
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["1", "2", "16"]  # bottom row: labelled
    with Image.open(result.figure) as png:  # the saved figure is this 2 x 2 one
        assert png.format == "PNG" and png.size == tuple(round(v * 100) for v in fig.get_size_inches())


def test_both_files_are_logged_to_the_sweeps_parent_run(store, result, tmp_path):
    c = MlflowClient(store.uri)
    assert [f.path for f in c.list_artifacts(store.sweep, "report")] == [
        "report/report.md",
        "report/report.png",
    ]
    md = c.download_artifacts(store.sweep, "report/report.md", str(tmp_path))
    assert Path(md).read_text() == result.table.read_text()
    assert c.list_artifacts(store.old_sweep) == []


def test_an_explicit_sweep_run_with_one_trial_gives_one_facet(store, tmp_path):
    got = report.build_report(None, tmp_path / "out", uri=store.uri, sweep_run_id=store.old_sweep)
    assert [(r.backbone, r.best_val_miou) for r in got.rows] == [("resnet101", 0.6)]
    assert "best official mIoU" not in got.table.read_text()
    fig = report.plot(got.rows)
    assert len(fig.axes) == 1 and [ln.get_label() for ln in fig.axes[0].lines] == ["bn"]
    assert got.figure.is_file()


def test_no_experiment_given_means_the_latest_sweep_anywhere(store, tmp_path):
    assert report.build_report(None, tmp_path, uri=store.uri).sweep_run_id == store.sweep


@pytest.mark.parametrize(
    "experiment, run_id, message",
    [
        ("nope", None, "no MLflow experiment named 'nope' at sqlite:///"),
        ("empty", None, "no sweep runs in experiment 'empty' at sqlite:///"),
        ("idle", None, "no finished or failed trial runs in sweep run {idle_sweep} ('study') of experiment"),
        (None, "0" * 32, "no sweep run with id '00000000000000000000000000000000'"),
        (None, "{trial}", "no sweep run with id '{trial}'"),  # a trial run is not a sweep run
        ("idle", "{sweep}", "sweep run '{sweep}' is not in experiment 'idle'"),
    ],
)  # fmt: skip
def test_nothing_to_report_is_a_one_line_lookup_error(store, tmp_path, experiment, run_id, message):
    ids = {"idle_sweep": store.idle_sweep, "trial": store.trial, "sweep": store.sweep}
    with pytest.raises(LookupError) as e:
        report.build_report(experiment, tmp_path, uri=store.uri, sweep_run_id=run_id and run_id.format(**ids))
    assert message.format(**ids) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "report.md").exists()


def test_an_empty_store_has_no_sweep_runs(tmp_path):
    with pytest.raises(
        LookupError, match=r"^no sweep runs at sqlite:///.*; run `orchestrator sweep SPEC` first$"
    ):
        report.build_report(None, tmp_path, uri=f"sqlite:///{tmp_path}/mlflow.db")


# ---------------------------------------------------------------- the study document: seeds, times, ensemble

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC, in ms
SWEEP_COMMAND = "orchestrator sweep jobs/seeds.yaml --set 'train.crop=[64, 64]'"
ENSEMBLE_COMMAND = "orchestrator ensemble --top 3 --experiment seeds"
# norm, batch per GPU, seed, val_miou per epoch, failure reason, duration in s
SEEDED = [
    ("gn:g8", 2, 0, [0.48], None, 90),
    ("bn", 1, 1, [0.46, 0.41], None, 120),
    ("bn", 2, 1, [0.54, 0.52], None, 80),
    ("bn", 1, 0, [0.30, 0.40], None, 100),
    ("gn:g8", 1, 1, [0.90], "non-finite loss at step 3", 10),  # failed: its 0.90 counts nowhere
    ("bn", 2, 0, [0.50], None, 60),
    ("gn:g8", 1, 0, [0.45], None, 200),
    ("bn", 1, 2, [0.43], None, 140),
]


@dataclass
class Seeded:
    uri: str
    sweep: str
    going_sweep: str  # the sweep of experiment "going", still running
    trials: dict[tuple[str, int, int], str]  # (norm, batch, seed) -> run id
    other_trial: str  # a trial of an earlier sweep of "seeds"
    ensemble: str  # the latest finished ensemble run of "seeds"


def _seeded_trial(c: MlflowClient, exp: str, sweep: str, norm: str, batch: int, seed: int, history: list,
                  reason: str | None, seconds: int, start: int,
                  budget: str | None = None) -> str:  # fmt: skip
    key = f"norm={norm},train.batch_per_gpu={batch},train.seed={seed}"
    key += f",train.budget={budget}" if budget else ""
    tags = {tracking.KIND: "trial", tracking.PARENT: sweep, tracking.TRIAL_KEY: key}
    # Named as a sweep names its runs: the swept values alone; the key is the tag.
    name = f"{norm} {batch} {seed}" + (f" {budget}" if budget else "")
    run_id = c.create_run(exp, start_time=start, run_name=name, tags=tags).info.run_id
    params = {"model.backbone": "resnet18", "norm": norm, "train.batch_per_gpu": batch, "train.seed": seed,
              "train.crop": [64, 64], "train.lr": 0.01}  # fmt: skip
    tracking.log_params(run_id, {**params, **({"train.budget": budget} if budget else {})}, c.tracking_uri)
    for epoch, value in enumerate(history, 1):
        tracking.log_epoch(run_id, {"epoch": epoch, "val_miou": value}, epoch, c.tracking_uri)
    if reason:
        tracking.set_tags(run_id, {tracking.FAILURE: reason}, c.tracking_uri)
    c.set_terminated(run_id, "FAILED" if reason else "FINISHED", end_time=start + seconds * 1000)
    return run_id


def _ensemble_run(c: MlflowClient, exp: str, start: int, members: list[str], scores: list[float],
                  miou: float, status: str = "FINISHED") -> str:  # fmt: skip
    tags = {tracking.KIND: "ensemble", tracking.COMMAND: ENSEMBLE_COMMAND}
    run_id = c.create_run(
        exp, start_time=start, run_name=f"ensemble-top{len(members)}", tags=tags
    ).info.run_id
    params = {"members": ",".join(members), "combine": "mean", "top": len(members)}
    tracking.log_params(run_id, params, c.tracking_uri)
    metrics = {"val_miou": miou, **{f"member{i}_val_miou": v for i, v in enumerate(scores)}}
    tracking.log_metrics(run_id, metrics, 0, c.tracking_uri)
    c.set_terminated(run_id, status, end_time=start + 1000)
    return run_id


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """Experiment "seeds": an earlier sweep (one trial), the latest sweep (SEEDED, 1h 02m 03s long, its
    command tagged), three ensembles (an older one, the latest finished one, a newer failed one).
    Experiment "going": a sweep still running, with one finished trial."""
    root = tmp_path_factory.mktemp("seeded")
    uri = f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri)
    exp, going = (c.create_experiment(n, artifact_location=(root / n).as_uri()) for n in ("seeds", "going"))
    sweep_tags = {tracking.KIND: "sweep", tracking.COMMAND: SWEEP_COMMAND}
    old = c.create_run(
        exp, start_time=T0 - DAY_MS, run_name="seeds", tags={tracking.KIND: "sweep"}
    ).info.run_id
    other = _seeded_trial(c, exp, old, "bn", 8, 0, [0.7], None, 30, T0 - DAY_MS)
    c.set_terminated(old, "FINISHED", end_time=T0 - DAY_MS + 60_000)
    sweep = c.create_run(exp, start_time=T0, run_name="seeds", tags=sweep_tags).info.run_id
    grid = {"grid.norm": ["bn", "gn:g8"], "grid.train.batch_per_gpu": [1, 2], "grid.train.seed": [0, 1, 2]}
    shared = {"model.backbone": "resnet18", "train.crop": [64, 64], "train.epochs": 2, "train.lr": 0.01,
              "train.steps_per_epoch": None}  # fmt: skip
    tracking.log_params(sweep, {**grid, **shared, "norm": "bn", "trials": 12}, uri)
    trials = {
        (norm, batch, seed): _seeded_trial(c, exp, sweep, norm, batch, seed, history, reason, seconds, T0 + i)
        for i, (norm, batch, seed, history, reason, seconds) in enumerate(SEEDED)
    }
    c.set_terminated(sweep, "FAILED", end_time=T0 + 3_723_000)
    _ensemble_run(c, exp, T0 + 3_800_000, [trials["bn", 2, 1]], [0.7], 0.99)
    members = [trials["bn", 2, 1], trials["bn", 1, 0], other]
    ensemble = _ensemble_run(c, exp, T0 + 3_900_000, members, [0.55, 0.58, 0.50], 0.61)
    _ensemble_run(c, exp, T0 + 4_000_000, members, [0.55, 0.58, 0.50], 0.99, status="FAILED")
    going_sweep = c.create_run(
        going, start_time=T0, run_name="going", tags={tracking.KIND: "sweep"}
    ).info.run_id
    _seeded_trial(c, going, going_sweep, "bn", 1, 0, [0.2], None, 50, T0)
    return Seeded(uri, sweep, going_sweep, trials, other, ensemble)


REPORT_COMMAND = "orchestrator report --experiment seeds --doc docs/study.md"


@pytest.fixture(scope="module")
def doc(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> report.ReportResult:
    path = tmp_path_factory.mktemp("repo") / "docs" / "study.md"
    return report.build_report("seeds", Path("unused"), uri=seeded.uri, doc=path, command=REPORT_COMMAND)


def test_trials_that_differ_only_in_their_seed_are_one_configuration(doc):
    by_name = {c.first.config_name: c for c in doc.configurations}
    assert list(by_name) == [
        "norm=bn,train.batch_per_gpu=1", "norm=bn,train.batch_per_gpu=2",
        "norm=gn:g8,train.batch_per_gpu=1", "norm=gn:g8,train.batch_per_gpu=2",
    ]  # fmt: skip
    assert [[t.seed for t in c.trials] for c in by_name.values()] == [[0, 1, 2], [0, 1], [0, 1], [0]]
    bn1, bn2, gn1, gn2 = by_name.values()
    # By hand: (0.40 + 0.46 + 0.43) / 3, each the best epoch of its seed; (0.50 + 0.54) / 2.
    assert (bn1.mean, bn1.low, bn1.high) == pytest.approx((0.43, 0.40, 0.46))
    assert (bn2.mean, bn2.low, bn2.high) == pytest.approx((0.52, 0.50, 0.54))
    assert (gn1.values, gn1.mean) == (pytest.approx([0.45]), pytest.approx(0.45))  # the failed seed is out
    assert (gn2.mean, bn1.mean_duration_s, gn1.mean_duration_s) == (pytest.approx(0.48), 120, 105)


def test_figure_points_are_seed_means_with_min_max_bars(doc):
    fig = report.plot(doc.rows)
    (ax,) = fig.axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}
    assert lines.keys() == {"bn", "gn:g8"}
    # Each norm's points sit aside by the same factor at every batch (bn left, gn:g8 right), within 5%.
    (bn_x, bn_y), (gn_x, gn_y) = lines["bn"], lines["gn:g8"]
    assert bn_x == pytest.approx([1 / 2**0.02, 2 / 2**0.02]) and gn_x == pytest.approx([2**0.02, 2 * 2**0.02])
    assert bn_y == pytest.approx([0.43, 0.52]) and gn_y == pytest.approx([0.45, 0.48])
    bars = [
        (float(s[0][0]), float(s[0][1]), float(s[1][1])) for col in ax.collections for s in col.get_segments()
    ]
    assert bars == [
        (pytest.approx(bn_x[0]), pytest.approx(0.40), pytest.approx(0.46)),
        (pytest.approx(bn_x[1]), pytest.approx(0.50), pytest.approx(0.54)),
    ]
    bn_colour = next(ln.get_color() for ln in ax.lines if ln.get_label() == "bn")
    assert [tuple(col.get_color()[0]) for col in ax.collections] == [
        tuple(matplotlib.colors.to_rgba(bn_colour))
    ]
    assert fig.legends[0].get_title().get_text() == "norm\n(mean over seeds,\nbars: min..max)"
    one_seed = report.plot([r for r in doc.rows if r.seed == 0])
    assert one_seed.legends[0].get_title().get_text() == "norm" and not one_seed.axes[0].collections


def test_document_has_wall_time_durations_ensemble_and_setup(seeded, doc):
    md = doc.table.read_text()
    assert f"- sweep run: `{seeded.sweep}` (FAILED)\n" in md
    assert "- grid: norm ['bn', 'gn:g8'] x train.batch_per_gpu [1, 2] x train.seed [0, 1, 2]\n" in md
    assert (
        "- every trial: model.backbone resnet18, train.crop [64, 64], train.epochs 2, train.lr 0.01\n" in md
    )
    assert "- trials: 8 (7 finished, 1 failed) in 4 configurations of 1/2/3 seed(s)\n" in md
    assert "- wall time of the sweep: 1h 02m 03s (2023-11-14 22:13 UTC to 2023-11-14 23:15 UTC)\n" in md
    # 90 + 120 + 80 + 100 + 10 + 60 + 200 + 140 = 800 s; 100 s per trial; 10 s to 200 s.
    assert "- trial durations: 13m 20s in all; per trial 1m 40s on average, 10s to 3m 20s\n" in md
    # The latest finished ensemble: 0.61 against its best member's 0.58 (bn, batch 1, seed 0).
    assert (
        f"- ensemble: val mIoU 0.6100, best member 0.5800 (`norm=bn,train.batch_per_gpu=1,train.seed=0`), "
        f"gain +0.0300 (run `{seeded.ensemble}`, 3 members, mean); "
        "1 of its members are not trials of this sweep\n"
    ) in md
    e = doc.ensemble
    assert e.run_id == seeded.ensemble and e.gain == pytest.approx(0.03) and e.outside == 1
    assert e.best_member == (seeded.trials["bn", 1, 0], "norm=bn,train.batch_per_gpu=1,train.seed=0", 0.58)
    head, *rows = _table(md, "## Ensemble")
    assert head == ["model", "run", "val mIoU"]
    assert rows == [
        ["norm=bn,train.batch_per_gpu=2,train.seed=1", seeded.trials["bn", 2, 1][:8], "0.5500"],
        ["norm=bn,train.batch_per_gpu=1,train.seed=0", seeded.trials["bn", 1, 0][:8], "0.5800"],
        ["norm=bn,train.batch_per_gpu=8,train.seed=0", seeded.other_trial[:8], "0.5000"],
        ["ensemble (mean)", seeded.ensemble[:8], "0.6100"],
    ]


def test_document_tables_summarize_configurations_and_list_every_seed(doc):
    md = doc.table.read_text()
    head, *rows = _table(md, "### resnet18, crop 64x64, epochs-equal")
    assert head == ["norm", "1/GPU", "2/GPU"]
    assert rows == [
        ["bn", "0.4300 (0.4000..0.4600)*", "0.5200 (0.5000..0.5400)"],  # seed 0 rose 0.10 at its end
        ["gn:g8", "0.4500", "0.4800"],
    ]
    head, *rows = _table(md, "## Configurations")
    assert head == ["configuration", "backbone", "norm", "batch/GPU", "crop", "seeds", "best val mIoU, mean",
                    "min..max", "duration, mean"]  # fmt: skip
    assert [[r[0], *r[5:]] for r in rows] == [
        ["norm=bn,train.batch_per_gpu=1", "3", "0.4300", "0.4000..0.4600", "2m 00s"],
        ["norm=bn,train.batch_per_gpu=2", "2", "0.5200", "0.5000..0.5400", "1m 10s"],
        ["norm=gn:g8,train.batch_per_gpu=1", "1 (1 failed)", "0.4500", "-", "1m 45s"],
        ["norm=gn:g8,train.batch_per_gpu=2", "1", "0.4800", "-", "1m 30s"],
    ]
    head, *rows = _table(md)
    assert [(r[3], r[4], r[6], r[7], r[8], r[9], r[10]) for r in rows] == [
        ("bn", "1", "0", "0.4000", "2", "+0.1000 (improving)", "1m 40s"),
        ("bn", "1", "1", "0.4600", "2", "-0.0500", "2m 00s"), ("bn", "1", "2", "0.4300", "1", "-", "2m 20s"),
        ("bn", "2", "0", "0.5000", "1", "-", "1m 00s"), ("bn", "2", "1", "0.5400", "2", "-0.0200", "1m 20s"),
        ("gn:g8", "1", "0", "0.4500", "1", "-", "3m 20s"), ("gn:g8", "1", "1", "0.9000", "1", "-", "10s"),
        ("gn:g8", "2", "0", "0.4800", "1", "-", "1m 30s"),
    ]  # fmt: skip
    assert "- still improving at their end: 1 of 7 finished trials (val mIoU up more than 0.5 points" in md
    # No trial logged per-image scores; a comparison with bn at 1/GPU rests on its improving seed.
    findings = {r[0]: r[3:] for r in _table(md, "## Which differences are findings")[1:]}
    assert findings == {
        "gn:g8 - bn at 1/GPU": ["untested: no per-image scores", "no: a seed still improving"],
        "gn:g8 - bn at 2/GPU": ["untested: no per-image scores", "yes"],
        "bn at 1/GPU - at 2/GPU": ["untested: no per-image scores", "no: a seed still improving"],
        "gn:g8 at 1/GPU - at 2/GPU": ["untested: no per-image scores", "yes"],
    }


def _fenced(md: str) -> list[str]:
    return md.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()


def test_commands_block_holds_the_sweep_ensemble_and_report_command_lines_in_order(seeded, doc):
    assert _fenced(doc.table.read_text()) == [SWEEP_COMMAND, ENSEMBLE_COMMAND, REPORT_COMMAND]
    assert doc.commands == [SWEEP_COMMAND, ENSEMBLE_COMMAND, REPORT_COMMAND]


def test_doc_is_written_with_its_figure_beside_it_and_logged(seeded, doc, tmp_path):
    assert doc.table.name == "study.md" and doc.figure == doc.table.with_name("study.png")
    (link,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.table.read_text())
    assert link == "study.png" and not Path(link).is_absolute()
    with Image.open(doc.table.parent / link) as png:  # the link resolves from the document's folder
        assert png.format == "PNG"
    c = MlflowClient(seeded.uri)
    assert [f.path for f in c.list_artifacts(seeded.sweep, "report")] == [
        "report/study.md",
        "report/study.png",
    ]
    assert not Path("unused").exists()


def test_a_sweep_still_running_without_commands_or_ensemble_says_so(seeded, tmp_path):
    got = report.build_report("going", tmp_path, uri=seeded.uri)
    md = got.table.read_text()
    assert re.search(
        r"^- wall time of the sweep: not ended: still running, or its driver died "
        r"\(started 2023-11-14 22:13 UTC, \d+h \d\dm \d\ds ago\)$", md, re.M
    )  # fmt: skip
    assert "- ensemble: none in experiment `going` (`orchestrator ensemble --top 3` makes one)\n" in md
    assert "## Ensemble" not in md and got.ensemble is None
    assert _fenced(md) == [f"# sweep run {seeded.going_sweep}: command not recorded"]


def test_doc_must_be_a_markdown_path(seeded, tmp_path):
    with pytest.raises(UsageError, match=r"--doc .*study\.png: give a markdown path ending in \.md"):
        report.build_report("seeds", tmp_path, uri=seeded.uri, doc=tmp_path / "study.png")


def test_cli_report_doc_records_its_own_command_line(seeded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", seeded.uri)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--experiment", "seeds", "--doc", "docs/study proxy.md"]) == 0
    out = capsys.readouterr().out
    assert f"ensemble run {seeded.ensemble}: val mIoU 0.6100, +0.0300 over its best member" in out
    md = (tmp_path / "docs" / "study proxy.md").read_text()
    assert _fenced(md)[-1] == "orchestrator report --experiment seeds --doc 'docs/study proxy.md'"
    assert (tmp_path / "docs" / "study proxy.png").is_file()


# ---------------------------------------------------------------- the chain, through the real command

CLI = [sys.executable, "-m", "orchestrator"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return proc


# What the demo's chain may print, all commands together, at this size (4 trials of 1 epoch, 5 shards): a
# line per shard packed (no terminal, no bar), the sweep's header, 3 lines per trial and its table, the
# ensemble's table and ~10 progress lines, the report's 3 lines. Tune's status tables or the workers'
# forwarded output would each overflow it.
CHAIN_LINES = 50


@pytest.mark.slow
def test_sweep_ensemble_and_report_doc_through_the_command(tmp_path, cli_env):
    """synth -> pack -> a 2 norms x 2 seeds sweep (Ray Tune + Ray Train, 2 gloo workers) -> ensemble of the
    top 2 -> `report --doc`: the document's numbers and command lines are those of the runs; the commands
    print a few lines, no warnings, and the sweep's Ray logs go to its log file."""
    commands = [
        ["data", "synth", "synth", "--train", "16", "--val", "4", "--size", "64x36"],
        ["data", "pack", "synth", "shards", "--shard-size", "4", "--workers", "1"],
        ["sweep", "chain.yaml", "--set", "train.epochs=1"],
        ["ensemble", "--top", "2", "--experiment", "chain"],
        ["report", "--experiment", "chain", "--doc", "docs/chain.md"],
    ]
    spec = {
        "name": "chain",
        "data": {"train": "shards/train", "val": "shards/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 2, "batch_per_gpu": 2, "crop": [64, 36], "lr": 0.01},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "grid": {"norm": ["bn", "gn:c16"], "train.seed": [0, 1]},
    }
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    printed = []
    for args in commands:
        proc = _run(args, tmp_path, cli_env)
        printed += proc.stdout.splitlines() + proc.stderr.splitlines()
    out = proc.stdout
    assert len(printed) <= CHAIN_LINES, "\n".join(printed)
    assert not [line for line in printed if "warning" in line.lower()]
    (log,) = (tmp_path / "runs" / "chain" / "logs").glob("sweep-*.log")
    assert "Started a local Ray instance" in log.read_text()  # Ray's logs, from the driver
    assert "(RayTrainWorker pid=" in log.read_text()  # and the workers' output
    assert "4 trials (4 finished, 0 failed) in 2 configurations" in out

    c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    (exp,) = [e.experiment_id for e in c.search_experiments() if e.name == "chain"]
    runs = c.search_runs([exp])
    kind = {k: [r for r in runs if r.data.tags[tracking.KIND] == k] for k in ("sweep", "trial", "ensemble")}
    assert [len(kind[k]) for k in kind] == [1, 4, 1]
    (sweep,), (ensemble,) = kind["sweep"], kind["ensemble"]
    assert sorted((r.data.params["norm"], r.data.params["train.seed"]) for r in kind["trial"]) == [
        ("bn", "0"), ("bn", "1"), ("gn:c16", "0"), ("gn:c16", "1"),
    ]  # fmt: skip
    lines = [shlex.join(["orchestrator", *args]) for args in commands[2:]]
    assert sweep.data.tags[tracking.COMMAND] == lines[0] and ensemble.data.tags[tracking.COMMAND] == lines[1]

    md = (tmp_path / "docs" / "chain.md").read_text()
    assert _fenced(md) == lines
    assert "- trials: 4 (4 finished, 0 failed) in 2 configurations of 2 seed(s)\n" in md
    seconds = (sweep.info.end_time - sweep.info.start_time) / 1000
    minutes = (
        f"{round(seconds) // 60}m {round(seconds) % 60:02d}s" if seconds >= 59.5 else f"{round(seconds)}s"
    )
    assert f"- wall time of the sweep: {minutes} (" in md
    m = ensemble.data.metrics
    gain = m["val_miou"] - max(m["member0_val_miou"], m["member1_val_miou"])
    assert f"- ensemble: val mIoU {m['val_miou']:.4f}, best member " in md and f"gain {gain:+.4f}" in md
    for norm in ("bn", "gn:c16"):
        trials = [r for r in kind["trial"] if r.data.params["norm"] == norm]
        best = [max(x.value for x in c.get_metric_history(r.info.run_id, "val_miou")) for r in trials]
        row = next(r for r in _table(md, "## Configurations")[1:] if r[2] == norm)
        assert row[5:8] == ["2", f"{sum(best) / 2:.4f}", f"{min(best):.4f}..{max(best):.4f}"]
    (link,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert link == "chain.png" and (tmp_path / "docs" / link).is_file()
    # Each trial logged its best epoch's per-image matrices (they make its score), and the report tested
    # the difference of the two norms with them.
    for r in kind["trial"]:
        matrices = torch.from_numpy(tracking.per_image_confusion(r.info.run_id, c.tracking_uri))
        best = max(x.value for x in c.get_metric_history(r.info.run_id, "val_miou"))
        assert matrices.shape == (4, 3, 3)
        assert metrics.summarize(matrices.sum(0))["val_miou"] == pytest.approx(best)
    ((what, *_, verdict),) = _table(md, "## Which differences are findings")[1:]
    assert what == "gn:c16 - bn at 2/GPU" and not verdict.startswith("untested")


# ---------------------------------------------------------------- which differences are findings


def _images(accuracy: float, seed: int, n: int = 40) -> torch.Tensor:
    """Per-image matrices [n, 3, 3] of 300 pixels each, right with probability `accuracy`."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(3, (n, 300), generator=g)
    wrong = (truth + torch.randint(1, 3, (n, 300), generator=g)) % 3
    pred = torch.where(torch.rand(n, 300, generator=g) < accuracy, truth, wrong)
    out = torch.zeros(n, 3, 3, dtype=torch.int64)
    return out.index_put_((torch.arange(n)[:, None], truth, pred), torch.ones_like(truth), accumulate=True)


# norm, batch, seed -> the per-image matrices its best epoch logged (None: it logged none)
INTERVALS = {
    ("bn", 1, 0): _images(0.6, 1),
    ("bn", 1, 1): _images(0.6, 2),
    ("gn:g8", 1, 0): _images(0.9, 3),
    ("gn:g8", 1, 1): _images(0.9, 4),
    ("bn", 8, 0): _images(0.8, 5),
    ("bn", 8, 1): _images(0.8, 6),
    ("gn:g8", 8, 0): _images(0.8, 5),  # the very matrices of bn at 8: no difference at all
    ("gn:g8", 8, 1): _images(0.8, 6),
    ("in", 8, 0): None,
}


@pytest.fixture(scope="module")
def intervals(tmp_path_factory: pytest.TempPathFactory) -> report.ReportResult:
    root = tmp_path_factory.mktemp("intervals")
    uri = f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("intervals", artifact_location=(root / "artifacts").as_uri())
    sweep = c.create_run(exp, start_time=T0, run_name="intervals", tags={tracking.KIND: "sweep"}).info.run_id
    for i, ((norm, batch, seed), matrices) in enumerate(INTERVALS.items()):
        score = 0.5 if matrices is None else metrics.summarize(matrices.sum(0))["val_miou"]
        run_id = _seeded_trial(c, exp, sweep, norm, batch, seed, [score], None, 60, T0 + i)
        if matrices is not None:
            tracking.log_per_image_confusion(run_id, matrices.numpy(), uri)
    c.set_terminated(sweep, "FINISHED", end_time=T0 + 600_000)
    return report.build_report("intervals", root / "out", uri=uri)


def test_the_report_tests_each_difference_of_the_figure_and_says_which_are_findings(intervals) -> None:
    md = intervals.table.read_text()
    rows = {r[0]: r[1:] for r in _table(md, "## Which differences are findings")[1:]}
    assert list(rows) == [
        "gn:g8 - bn at 1/GPU",
        "gn:g8 - bn at 8/GPU",
        "in - bn at 8/GPU",
        "bn at 1/GPU - at 8/GPU",
        "gn:g8 at 1/GPU - at 8/GPU",
    ]
    means = {
        (n, b): sum(metrics.summarize(INTERVALS[n, b, s].sum(0))["val_miou"] for s in (0, 1)) / 2
        for n, b, _ in INTERVALS
        if n != "in"
    }
    assert rows["gn:g8 - bn at 1/GPU"][0] == f"{100 * (means['gn:g8', 1] - means['bn', 1]):+.1f}"
    assert rows["gn:g8 - bn at 1/GPU"][2] == "yes" and rows["bn at 1/GPU - at 8/GPU"][2] == "yes"
    # The same images, the seeds drawn apart (each side its own draw): 0, within an interval about it.
    same = rows["gn:g8 - bn at 8/GPU"]
    low, high = (float(x) for x in same[1].split(" .. "))
    assert same[0] == "+0.0" and low < 0 < high and same[2:] == ["no: the interval holds 0", "yes"]
    assert rows["in - bn at 8/GPU"][1:] == ["-", "untested: no per-image scores", "yes"]
    assert "3 of 5 differences are findings; 1 cannot be tested (a trial logged no per-image scores)." in md


def test_each_protocol_is_named_and_compared_within_its_own_panel(tmp_path) -> None:
    """A grid over train.budget: epochs-equal and steps-equal trials of the same norms and batches are two
    panels, two tables, two sets of comparisons, never one point; the document says what each held equal."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("protocols", artifact_location=(tmp_path / "artifacts").as_uri())
    sweep = c.create_run(exp, start_time=T0, run_name="protocols", tags={tracking.KIND: "sweep"}).info.run_id
    scores = {("epochs", 1): 0.6, ("epochs", 8): 0.5, ("steps:64", 1): 0.6, ("steps:64", 8): 0.7}
    for i, ((budget, batch), score) in enumerate(scores.items()):
        _seeded_trial(c, exp, sweep, "bn", batch, 0, [score], None, 60, T0 + i, budget=budget)
    c.set_terminated(sweep, "FINISHED", end_time=T0 + 600_000)
    result = report.build_report("protocols", tmp_path / "out", uri=uri)
    md = result.table.read_text()
    assert (
        "- protocols (each its own panel and tables, compared within): epochs-equal: every trial trains its "
        "epochs over the same images, a larger batch in fewer optimizer steps; steps-equal (64 steps): every "
        "trial takes the same optimizer steps, a larger batch seeing more images\n"
    ) in md
    assert _table(md, "### resnet18, crop 64x64, epochs-equal")[1:] == [["bn", "0.6000", "0.5000"]]
    assert _table(md, "### resnet18, crop 64x64, steps-equal (64 steps)")[1:] == [["bn", "0.6000", "0.7000"]]
    fig = report.plot(result.rows)
    assert [ax.get_title() for ax in fig.axes] == [
        "resnet18, crop 64x64, epochs-equal", "resnet18, crop 64x64, steps-equal (64 steps)"
    ]  # fmt: skip
    compared = report.differences(result.configurations, uri)
    assert [(x.facet[2], x.what, round(x.a.mean - x.b.mean, 4)) for x in compared] == [
        ("epochs", "bn at 1/GPU - at 8/GPU", 0.1),
        ("steps:64", "bn at 1/GPU - at 8/GPU", -0.1),
    ]


def test_each_baseline_named_is_compared_with_every_other_norm_once(intervals, monkeypatch, capsys) -> None:
    uri = f"sqlite:///{intervals.table.parent.parent}/mlflow.db"  # the fixture's store
    compared = report.differences(intervals.configurations, uri, baselines=("bn", "gn:g8"))
    assert [c.what for c in compared] == [
        "gn:g8 - bn at 1/GPU",
        "gn:g8 - bn at 8/GPU",
        "in - bn at 8/GPU",
        "in - gn:g8 at 8/GPU",  # and no bn - gn:g8: that pair is made once, the other way round
        "bn at 1/GPU - at 8/GPU",
        "gn:g8 at 1/GPU - at 8/GPU",
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    argv = ["report", "--experiment", "intervals", "--out", str(intervals.table.parent)]
    assert main([*argv, "--baseline", "gn:g8", "--baseline", "frn"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'frn': no trial of this sweep ran it; allowed: bn, gn:g8, in" in err
    assert main([*argv, "--baseline", "gn:g8"]) == 0
    rows = [r[0] for r in _table(intervals.table.read_text(), "## Which differences are findings")[1:]]
    assert rows[:3] == ["bn - gn:g8 at 1/GPU", "bn - gn:g8 at 8/GPU", "in - gn:g8 at 8/GPU"]
