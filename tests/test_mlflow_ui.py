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

from orchestrator import tracking
from orchestrator.spec import trial_key

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
GRID = {"norm": ["bn", "gn"], "train.batch_per_gpu": [2, 4]}
BASE = {"model.backbone": "resnet18", "model.head": "deeplabv3plus", "train.crop": 128, "train.epochs": 3}
SHARE_KEY = "orchestrator-test"
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
    """One sweep run and a trial run per grid point, written as `orchestrator sweep` writes them."""
    experiment_id = tracking.client(uri).create_experiment("ui-test", artifact_location=artifacts.as_uri())
    sweep_params = {**{f"grid.{k}": v for k, v in GRID.items()}, **BASE, "trials": 4}
    sweep_id = tracking.start_sweep_run(experiment_id, "ui-test", sweep_params, uri)
    trials, params = {}, {}
    for i, (norm, batch) in enumerate((n, b) for n in GRID["norm"] for b in GRID["train.batch_per_gpu"]):
        config = {**BASE, "norm": norm, "train.batch_per_gpu": batch, "seed": 0}
        name = trial_key(config, list(GRID))
        run_id = tracking.start_trial_run(experiment_id, sweep_id, name, config, uri)
        for epoch in range(3):
            metrics = {"epoch": epoch, "train_loss": 1.5 - 0.25 * epoch, "val_miou": 0.125 * (epoch + i)}
            tracking.log_epoch(run_id, metrics, epoch, uri)
        tracking.end_run(run_id, uri)
        trials[name] = run_id
        params[name] = {"norm": norm, "train.batch_per_gpu": str(batch), "model.backbone": "resnet18"}
    tracking.end_run(sweep_id, uri)
    # The view a user saves with "Share": trials flat (ordered by a param), params and metrics as columns.
    columns = [f"params.`{k}`" for k in ("model.backbone", "norm", "train.batch_per_gpu")]
    state = {
        "orderByKey": "params.`norm`",
        "orderByAsc": True,
        "selectedColumns": [*columns, "metrics.`val_miou`", "metrics.`train_loss`"],
    }
    tracking.client(uri).set_experiment_tag(
        experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(state)
    )
    return experiment_id, sweep_id, trials, params


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


def test_params_are_comparable_columns(mlflow_ui: UI) -> None:
    """A saved view shows each trial's grid params and metrics as columns; its screenshot is the
    test artifact test-artifacts/mlflow-ui-runs.png."""
    ui = mlflow_ui
    url = ui.runs_page(f"?viewStateShareKey={SHARE_KEY}")
    page = _load(ui, url, lambda p: all(run_id in p.rows for run_id in ui.trials.values()))
    for name, run_id in ui.trials.items():
        cells = page.rows.get(run_id, {})
        assert name in cells.get("attributes.`Run Name`", ""), f"{name} not on {url}: {page.text[:3000]}"
        shown = {k: cells.get(f"params.`{k}`") for k in ui.params[name]}
        assert shown == ui.params[name], f"{name}: param columns {shown}"
        assert cells.get("metrics.`val_miou`"), f"{name}: no val_miou column: {cells}"
    _screenshot(ui, url, "mlflow-ui-runs.png")
