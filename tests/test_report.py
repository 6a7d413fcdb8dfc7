"""`orchestrator report` on a real SQLite MLflow store, written the way sweeps write it (no Ray)."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator import report, tracking

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


def _table(md: str) -> list[list[str]]:
    """The markdown table's rows (header first, rule left out) as lists of cells, pipes unescaped."""
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in md.splitlines() if line.startswith("|")]
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
    assert "- trials: 7 (6 finished, 1 failed)" in md
    head, *rows = _table(md)
    assert head == ["trial", "run", "backbone", "norm", "batch/GPU", "crop", "best val mIoU",
                    "best official mIoU", "last epoch", "status", "failure"]  # fmt: skip
    assert len(rows) == len(EXPECTED)
    assert [(r[2], r[5], r[3], int(r[4])) for r in rows] == list(EXPECTED)
    assert [float(r[6]) for r in rows] == pytest.approx(list(EXPECTED.values()))
    assert [r[7] for r in rows] == ["-", "-", "0.8000", "-", "-", "-", "-"]
    failed = rows.pop(-2)
    assert failed[9:] == ["FAILED", "non-finite loss at step 12 (lr=0.02 | amp=bf16)"]
    assert {r[9] for r in rows} == {"FINISHED"} and {r[10] for r in rows} == {"-"}
    assert rows[0][0] == "model.backbone=resnet18,norm=bn,train.batch_per_gpu=1,train.crop=64x64"


def test_figure_has_a_facet_per_backbone_and_crop_and_a_line_per_norm(result):
    fig = report.plot(result.rows)
    assert [ax.get_title() for ax in fig.axes] == [
        "resnet18, crop 64x64", "resnet18, crop 128x64", "resnet50, crop 64x64", "resnet50, crop 128x64",
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
