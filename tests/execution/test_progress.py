"""The sweep's console view, driven as Tune's loop drives it: a line per trial event off a terminal, a table
redrawn in place on one."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import ray.cloudpickle as cloudpickle

from orchestrator import spec as specs
from orchestrator.execution.progress import SweepProgress

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TuneTrial:
    """What SweepProgress reads of a ray.tune Trial."""

    config: dict
    status: str = "PENDING"
    last_result: dict = field(default_factory=dict)


def smoke_trials():
    return specs.expand(specs.load(ROOT / "jobs/smoke.yaml"))


def epoch(n: int, miou: float, best: float, img_s: float) -> dict:
    return {"epoch": n, "val_miou": miou, "best_val_miou": best, "images_per_s": img_s, "train_loss": 0.5}


def run(progress: SweepProgress, tune_trials: list[TuneTrial], steps) -> None:
    """Apply each step's changes ({index: (status, result)}) and call the callback as Tune does."""
    progress.setup()
    for changes in steps:
        for i, (status, result) in changes.items():
            tune_trials[i].status = status
            tune_trials[i].last_result = result
        progress.on_step_end(iteration=0, trials=tune_trials)
    progress.on_experiment_end(trials=tune_trials)


def test_off_a_terminal_each_trial_event_is_one_line() -> None:
    trials = smoke_trials()
    tune_trials = [TuneTrial({"trial": t.without_secrets()}) for t in trials]
    out = io.StringIO()
    steps = [
        {},  # nothing changed yet: nothing printed
        {0: ("RUNNING", {})},
        {},
        {0: ("RUNNING", epoch(1, 0.25, 0.25, 7.35))},
        {0: ("RUNNING", epoch(1, 0.25, 0.25, 7.35))},  # the same result again: nothing
        {0: ("RUNNING", epoch(2, 0.20, 0.25, 8.0))},
        {0: ("TERMINATED", epoch(3, 0.45, 0.45, 7.42)), 1: ("RUNNING", {})},  # result and end in one step
        {1: ("ERROR", {}), 2: ("RUNNING", epoch(1, 0.30, 0.30, 7.0))},
        {2: ("TERMINATED", epoch(1, 0.30, 0.30, 7.0))},  # before its last epoch: diverged or stopped
    ]
    run(SweepProgress(trials, out=out), tune_trials, steps)
    lines = [re.sub(r"^\[\d:\d\d:\d\d\] ", "", line) for line in out.getvalue().splitlines()]
    a, b, c = (t.key.ljust(32) for t in trials[:3])
    assert lines == [
        f"{a}  running",
        f"{a}  epoch 1/3  val mIoU 0.2500  7.3 img/s",
        f"{a}  epoch 2/3  val mIoU 0.2000  8.0 img/s",
        f"{a}  epoch 3/3  val mIoU 0.4500  7.4 img/s",
        f"{a}  finished, best val mIoU 0.4500",
        f"{b}  running",
        f"{b}  failed",
        f"{c}  epoch 1/3  val mIoU 0.3000  7.0 img/s",
        f"{c}  running",
        f"{c}  ended early (diverged or stopped), best val mIoU 0.3000",
    ]
    assert "\x1b" not in out.getvalue()


def test_on_a_terminal_the_table_is_redrawn_over_itself_and_cleared_at_the_end() -> None:
    trials = smoke_trials()
    tune_trials = [TuneTrial({"trial": t.without_secrets()}) for t in trials]
    out = io.StringIO()
    progress = SweepProgress(trials, out=out, live=True)
    run(progress, tune_trials, [{0: ("RUNNING", epoch(1, 0.25, 0.25, 7.35))}, {0: ("TERMINATED", {})}])
    draws = out.getvalue().split("\x1b[6F\x1b[J")  # cursor up over the 6 lines drawn, erase below
    assert len(draws) == 3  # first table, the redrawn one, then the erase at the end with nothing after it
    first = draws[0].splitlines()
    assert re.fullmatch(r"1 running, 3 pending  \[0:00:00\]", first[0])
    assert first[2].split() == [trials[0].key, "running", "1/3", "0.2500", "0.2500", "7.3"]
    assert first[3].split() == [trials[1].key, "pending", "-", "-", "-", "-"]
    assert draws[1].splitlines()[2].split()[:3] == [trials[0].key, "finished", "-"]
    assert draws[2] == ""


def test_on_a_short_terminal_running_and_failed_trials_come_first(monkeypatch) -> None:
    """A grid of hundreds cannot be redrawn in place taller than the terminal: it shows what matters."""
    monkeypatch.setenv("LINES", "7")  # room for 3 trials under the 2 header lines, a "more" line, the cursor
    trials = smoke_trials()
    tune_trials = [TuneTrial({"trial": t.without_secrets()}) for t in trials]
    out = io.StringIO()
    steps = [{0: ("TERMINATED", epoch(3, 0.4, 0.45, 7.0)), 1: ("RUNNING", {}), 3: ("ERROR", {})}]
    run(SweepProgress(trials, out=out, live=True), tune_trials, steps)
    table = out.getvalue().split("\x1b[6F\x1b[J")[0].splitlines()
    assert len(table) == 6
    assert [line.split()[:2] for line in table[2:5]] == [
        [trials[0].key, "finished"], [trials[1].key, "running"], [trials[3].key, "failed"],
    ]  # fmt: skip
    assert table[5] == "... and 1 more"


def test_after_tune_prints_an_error_the_next_table_goes_below_it() -> None:
    trials = smoke_trials()
    tune_trials = [TuneTrial({"trial": t.without_secrets()}) for t in trials]
    out = io.StringIO()
    progress = SweepProgress(trials, out=out, live=True)
    progress.setup()
    progress.on_step_end(iteration=0, trials=tune_trials)
    tune_trials[0].status = "ERROR"
    progress.on_trial_error(iteration=0, trials=tune_trials, trial=tune_trials[0])
    progress.on_step_end(iteration=1, trials=tune_trials)
    assert "\x1b[" not in out.getvalue()  # two tables, one under the other: the traceback stays readable


def test_it_survives_the_pickle_tune_keeps_of_its_callbacks() -> None:
    """Tune saves its run config, callbacks included, with the experiment; a resumed sweep runs them."""
    trials = smoke_trials()
    restored = cloudpickle.loads(cloudpickle.dumps(SweepProgress(trials)))
    out = io.StringIO()
    restored._out = out
    tune_trials = [TuneTrial({"trial": t.without_secrets()}, "TERMINATED") for t in trials]
    run(restored, tune_trials, [{}])
    assert out.getvalue().count("finished, best val mIoU -") == 4
