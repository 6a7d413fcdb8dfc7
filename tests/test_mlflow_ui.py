"""The MLflow UI as a user sees a sweep: `mlflow server` on 127.0.0.1 over a SQLite store written by the
project's tracking functions, loaded in headless Chromium. The screenshots stay in test-artifacts/.

What the runs page (`/#/experiments/<id>/runs`, MLflow 3.17) renders:
- as linked: only the sweep run, its trial runs nested under it (collapsed; "N matching runs" counts them);
- ordered by any column but the start time (`?orderByKey=...`): every run flat, trials included;
- params and metrics are columns one adds from "Columns"; a shared view (what the UI's Share writes: an
  experiment tag `mlflow.sharedViewState.<key>`, opened with `?viewStateShareKey=<key>`) selects them.
The grid renders one row per run with `row-id` = the run id and one cell per column with `col-id`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow_server import mlflow_server, stop

from orchestrator import mlflow_private, tracking
from orchestrator import spec as specs
from orchestrator.execution import sweep

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
GRID = {"norm": ["bn", "gn:g8"], "train.batch_per_gpu": [2, 4]}
SPEC = {"model": {"backbone": "resnet18"}, "train": {"crop": [128, 128], "epochs": 3}}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1920,1080",  # wide enough that the grid renders every column we select
]


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class UI:
    url: str  # http://127.0.0.1:PORT
    experiment_id: str
    sweep_name: str
    sweep_id: str
    trials: dict[str, str]  # run name -> run id
    params: dict[str, dict[str, str]]  # run name -> the params the grid varies, as logged
    browser: str
    tmp: Path

    def runs_page(self, query: str = "") -> str:
        return f"{self.url}/#/experiments/{self.experiment_id}/runs{query}"


def _make_sweep(uri: str, artifacts: Path) -> tuple[str, str, dict[str, str], dict[str, dict[str, str]]]:
    """A sweep run and a trial run per grid point, written by the functions `orchestrator sweep` writes them
    with (its parent's params, description and view; each trial's name and per-epoch metrics as rank 0 logs
    them), without training anything."""
    experiment_id = tracking.client(uri).create_experiment("ui-test", artifact_location=artifacts.as_uri())
    spec = specs.validate(
        {"name": "ui-test", "data": {"train": "d/train", "val": "d/val"}, **SPEC, "grid": GRID}
    )
    trials = specs.expand(spec)
    sweep_id = sweep._start_sweep_run(spec, trials, experiment_id, uri)
    names, params, outcomes = {}, {}, []
    for i, trial in enumerate(trials):
        run_id = tracking.start_trial_run(
            experiment_id, sweep_id, trial.key, specs.public_params(trial.config), uri, trial.name
        )
        best = (-1.0, 0)
        for epoch in (1, 2, 3):  # trial i peaks at epoch 1 + i % 3: the last epoch is not the best
            miou = 0.25 + 0.05 * i - 0.02 * abs(epoch - 1 - i % 3)
            best = max(best, (miou, epoch))
            metrics = {"train_loss": 1.5 - 0.25 * epoch, "val_miou": miou}
            tracking.log_epoch(
                run_id, {**metrics, "best_val_miou": best[0], "best_epoch": best[1]}, epoch, uri
            )
        tracking.end_run(run_id, uri)
        outcomes.append(sweep.TrialOutcome(trial.key, "FINISHED", {"best_val_miou": best[0]}))
        names[trial.name] = run_id
        params[trial.name] = {k: str(trial.config[k]) for k in GRID}
    sweep._end_sweep_run(trials, outcomes, experiment_id, sweep_id, uri)
    tracking.end_run(sweep_id, uri)
    return experiment_id, sweep_id, names, params


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH: the MLflow UI test needs one")
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    experiment_id, sweep_id, trials, params = _make_sweep(uri, tmp / "artifacts")
    with mlflow_server(uri, tmp / "artifacts", tmp / "server.log") as url:
        yield UI(url, experiment_id, "ui-test", sweep_id, trials, params, browser, tmp)


def _chromium(ui: UI, url: str, *args: str, budget_ms: int = 15_000) -> str:
    """Run headless Chromium on url with a fresh profile (no saved view state); returns stdout."""
    profile = ui.tmp / f"profile-{time.monotonic_ns()}"
    cmd = [ui.browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    proc = subprocess.Popen(
        [*cmd, *args, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # dbus and GPU warnings on a headless box
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop(proc, timeout=5)
        shutil.rmtree(profile, ignore_errors=True)
    return out.decode(errors="replace")


@dataclass
class Page:
    html: str
    text: str  # the visible text, whitespace-separated
    rows: dict[str, dict[str, str]]  # grid row-id (the run id) -> col-id -> cell text

    def matching_runs(self) -> int | None:
        m = re.search(r"(\d+) matching runs?", self.text)
        return int(m.group(1)) if m else None


# HTML elements without an end tag.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _GridParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None, str | None]] = []  # (tag, row-id, col-id)
        self.skip = 0  # inside <script>/<style>
        self.text: list[str] = []
        self.rows: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            return
        a = dict(attrs)
        row, col = self.stack[-1][1:] if self.stack else (None, None)
        row = a.get("row-id") or row
        col = (a.get("col-id") if a.get("role") == "gridcell" else None) or col
        self.stack.append((tag, row, col))
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        while self.stack:  # tolerate unbalanced markup: close up to the matching tag
            closed = self.stack.pop()[0]
            self.skip -= closed in ("script", "style")
            if closed == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.skip or not data.strip():
            return
        self.text.append(data.strip())
        row, col = self.stack[-1][1:] if self.stack else (None, None)
        if row and col:
            cells = self.rows.setdefault(row, {})
            cells[col] = (cells.get(col, "") + " " + data.strip()).strip()


def _load(ui: UI, url: str, ready: Callable[[Page], bool]) -> Page:
    """Chromium's DOM of url after its scripts ran; a longer virtual time budget while `ready` fails
    (the runs arrive by fetch after the first render)."""
    for budget_ms in (15_000, 30_000, 60_000):
        html = _chromium(ui, url, "--dump-dom", budget_ms=budget_ms)
        parser = _GridParser()
        parser.feed(html)
        page = Page(html, " ".join(parser.text), parser.rows)
        if ready(page):
            break
    return page


def _screenshot(ui: UI, url: str, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    _chromium(ui, url, f"--screenshot={path}")
    assert path.is_file(), f"Chromium wrote no screenshot of {url}"
    _check_png(path)
    return path


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 20_000, f"{path}: {path.stat().st_size} bytes, too small to show a page"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1920, 1080), (img.format, img.size)
        gray = img.convert("L")
        low, high = gray.getextrema()
        assert high - low > 100, f"{path} is nearly one colour ({low}..{high})"
        assert gray.getcolors(maxcolors=16) is None, f"{path} has under 16 grey levels: a blank page?"


def test_runs_link_shows_the_sweep_with_its_trials_nested(mlflow_ui: UI) -> None:
    """The link `/#/experiments/<id>/runs` lists the sweep run; its trial runs are nested in it."""
    ui = mlflow_ui
    page = _load(ui, ui.runs_page(), lambda p: ui.sweep_name in p.text)
    assert ui.sweep_name in page.text, f"the sweep run is not on {ui.runs_page()}: {page.text[:2000]}"
    assert set(page.rows) == {ui.sweep_id}, f"top-level rows: {page.rows}"  # the trials are folded in
    assert page.matching_runs() == 1 + len(ui.trials), page.text[:2000]
    assert not any(name in page.text for name in ui.trials), "trial runs shown outside their sweep run"
    _screenshot(ui, ui.runs_page(), "mlflow-ui-sweep.png")


def test_runs_page_lists_every_trial_run(mlflow_ui: UI) -> None:
    """Ordered by a param (as a click on its column header does), every trial run is a row of the page."""
    ui = mlflow_ui
    url = ui.runs_page("?" + urllib.parse.urlencode({"orderByKey": "params.`norm`", "orderByAsc": "true"}))
    page = _load(ui, url, lambda p: all(name in p.text for name in ui.trials))
    missing = [name for name in ui.trials if name not in page.text]
    assert not missing, f"trial runs not on {url}: {missing}\n{page.text[:3000]}"
    assert {ui.sweep_id, *ui.trials.values()} <= set(page.rows)
    for name, run_id in ui.trials.items():
        assert name in page.rows[run_id].get("attributes.`Run Name`", ""), page.rows[run_id]


def test_the_printed_link_leads_with_the_headline_and_shows_each_trial_whole(mlflow_ui: UI) -> None:
    """The link sweep, ensemble and report print opens the sweep's view: every trial a row under its short
    name, its best val mIoU (not its last epoch's) and the swept params as columns. Its screenshot is
    test-artifacts/mlflow-ui-runs.png (docs/mlflow-runs.png)."""
    ui = mlflow_ui
    url = tracking.runs_link("ui-test", ui.url)
    assert url == ui.runs_page(f"?viewStateShareKey={mlflow_private.VIEW_KEY}")
    # A link is shown and shared: never with the credentials of the tracking URI.
    assert tracking.runs_link("ui-test", ui.url.replace("http://", "http://someone:secret@")) == url
    page = _load(ui, url, lambda p: all(run_id in p.rows for run_id in ui.trials.values()))
    client = tracking.client(f"{ui.url}")
    names = []
    for name, run_id in ui.trials.items():
        cells = page.rows.get(run_id, {})
        names.append(re.sub(r"^#[0-9a-f]{6} ", "", cells.get("attributes.`Run Name`", "")))  # less its colour
        assert name in names[-1], f"{name} not on {url}: {page.text[:3000]}"
        shown = {k: cells.get(f"params.`{k}`") for k in ui.params[name]}
        assert shown == ui.params[name], f"{name}: param columns {shown}"
        history = client.get_metric_history(run_id, "val_miou")
        best, last = max(m.value for m in history), max(history, key=lambda m: m.step).value
        assert float(cells.get("metrics.`best_val_miou`", "nan")) == pytest.approx(best, abs=1e-3), cells
        assert float(cells.get("metrics.`val_miou`", "nan")) == pytest.approx(last, abs=1e-3), cells
    assert len(set(names)) == len(names) and max(map(len, names)) <= 12, names  # short: the column shows them
    _screenshot(ui, url, "mlflow-ui-runs.png")


def test_a_search_by_a_swept_param_finds_trials_and_not_their_sweep(mlflow_ui: UI) -> None:
    """The sweep run's params are the grid's axes, not its first point's: `params.norm = 'bn'` matches the
    bn trials alone (listed flat, as the printed link lists them; nested, the UI shows their sweep run as
    the group they are in, not as a match)."""
    ui = mlflow_ui
    search = {
        "searchFilter": "params.norm = 'bn'",
        "orderByKey": "metrics.`best_val_miou`",
        "orderByAsc": "false",
    }
    url = ui.runs_page("?" + urllib.parse.urlencode(search))
    bn = {run_id for name, run_id in ui.trials.items() if ui.params[name]["norm"] == "bn"}
    page = _load(ui, url, lambda p: bn <= set(p.rows))
    assert bn <= set(page.rows), f"{url}: {page.text[:3000]}"
    assert ui.sweep_id not in page.rows and set(page.rows) == bn, page.rows.keys()
    assert page.matching_runs() == len(bn), page.text[:2000]


def test_the_sweep_run_reads_as_a_sweep(mlflow_ui: UI) -> None:
    """Its description says what was swept and how its trials ended; its summary metrics and spec.yaml."""
    ui = mlflow_ui
    run = tracking.client(ui.url).get_run(ui.sweep_id)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("Sweep ui-test: norm (2) x train.batch_per_gpu (2), 4 trials of resnet18")
    assert note.endswith("Ended: 4 trials: 4 finished; the best, gn:g8 4: best_val_miou 0.4000.")
    assert run.data.metrics["trials_finished"] == 4 and run.data.metrics["best_trial_val_miou"] == 0.4
    assert "best_val_miou" not in run.data.metrics  # sorted by the trials' headline, it sorts last
    assert "norm" not in run.data.params and run.data.params["grid.norm"] == "['bn', 'gn:g8']"
    page = _load(
        ui, f"{ui.url}/#/experiments/{ui.experiment_id}/runs/{ui.sweep_id}", lambda p: "Ended:" in p.text
    )
    assert "Ended: 4 trials: 4 finished" in page.text, page.text[:3000]
    compare = f"{ui.url}/#/compare-runs?" + urllib.parse.urlencode(
        {"runs": json.dumps(list(ui.trials.values())), "experiments": json.dumps([ui.experiment_id])}
    )
    _screenshot(ui, compare, "mlflow-ui-compare.png")
