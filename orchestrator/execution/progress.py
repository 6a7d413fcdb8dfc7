"""A sweep's progress on the console: a row per trial (status, epoch, val mIoU, img/s), redrawn in place on
a terminal; elsewhere (a file, `ray job logs`) a line per trial event. Tune's own status tables, which print
every trial's configuration, stay off (RunConfig(verbose=0)); `orchestrator sweep -v` brings them back.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import IO

from ray import tune

from orchestrator.spec import Trial

# Tune's trial states, as a user reads them.
STATUS = {
    "PENDING": "pending",
    "RUNNING": "running",
    "PAUSED": "paused",
    "TERMINATED": "finished",
    "ERROR": "failed",
}
# "ended": finished before its last epoch (the divergence guard or the search's scheduler ended it).
SHOWN_FIRST = ("running", "failed", "paused", "ended", "finished", "pending")  # on a terminal too short


@dataclass(frozen=True)
class Row:
    status: str = "pending"
    epoch: int = 0
    val_miou: float | None = None
    best: float | None = None
    images_per_s: float | None = None


class SweepProgress(tune.Callback):
    """Follows Tune's trials after each step of its loop and shows what changed.

    out: where to write (default: stdout); live: redraw a table in place (default: whether out is a
    terminal). Both are looked up when the sweep starts: Tune pickles its callbacks with the experiment
    and a resumed sweep runs them in a new process."""

    def __init__(self, trials: list[Trial], out: IO[str] | None = None, live: bool | None = None):
        self._out, self._live = out, live
        self.epochs = {t.key: t.spec.train.epochs for t in trials}
        self.rows = {t.key: Row() for t in trials}
        self.width = max(len(k) for k in self.rows)

    def setup(self, **info) -> None:
        self.out = self._out or sys.stdout
        self.live = self.out.isatty() if self._live is None else self._live
        self.start = time.monotonic()
        self.drawn = 0  # lines of the live table on screen, to redraw over
        self.shown_at = 0.0

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k in ("_out", "_live", "epochs", "rows", "width")}

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        changed = False
        for trial in trials:
            key = trial.config["trial"].key
            row = _row(trial.status, trial.last_result or {})
            if row.status == "finished" and 0 < row.epoch < self.epochs[key]:
                row = replace(row, status="ended")
            if row != self.rows.get(key):
                if not self.live:
                    self._print_change(key, self.rows.get(key, Row()), row)
                self.rows[key], changed = row, True
        if self.live and (changed or time.monotonic() - self.shown_at >= 1):
            self._draw()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        # Tune has just printed the error (a traceback) below the table: draw the next one under it.
        self.drawn = 0

    def on_experiment_end(self, trials: list, **info) -> None:
        if self.live and self.drawn:  # the command's summary table follows
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.out.flush()

    def _print_change(self, key: str, old: Row, new: Row) -> None:
        events = []
        if new.epoch != old.epoch and new.epoch:
            events.append(
                f"epoch {new.epoch}/{self.epochs[key]}  val mIoU {_num(new.val_miou)}  "
                f"{_num(new.images_per_s, '.1f')} img/s"
            )
        if new.status == "finished" != old.status:
            events.append(f"finished, best val mIoU {_num(new.best)}")
        elif new.status == "ended" != old.status:
            events.append(f"ended early (diverged or stopped), best val mIoU {_num(new.best)}")
        elif new.status != old.status:
            events.append(new.status)
        for event in events:
            self.out.write(f"[{_clock(time.monotonic() - self.start)}] {key:<{self.width}}  {event}\n")
        self.out.flush()

    def _draw(self) -> None:
        counts = Counter(row.status for row in self.rows.values())
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        lines = [
            f"{summary}  [{_clock(time.monotonic() - self.start)}]",
            f"{'trial':<{self.width}}  status    epoch  val mIoU    best   img/s",
        ]
        # A table taller than the terminal cannot be redrawn in place (the cursor stops at its top line):
        # a grid of hundreds shows its running and failed trials first, then the latest finished.
        room = max(shutil.get_terminal_size().lines - len(lines) - 2, 1)
        keys = list(self.rows)
        shown = {key for _, key in sorted(enumerate(keys), key=self._priority)[:room]}
        for key in (k for k in keys if k in shown):
            r = self.rows[key]
            epoch = f"{r.epoch}/{self.epochs[key]}" if r.epoch else "-"
            lines.append(
                f"{key:<{self.width}}  {r.status:<8}  {epoch:>5}  {_num(r.val_miou):>8}  {_num(r.best):>6}  "
                f"{_num(r.images_per_s, '.1f'):>6}"
            )
        if len(shown) < len(keys):
            lines.append(f"... and {len(keys) - len(shown)} more")
        up = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
        self.out.write(up + "\n".join(lines) + "\n")
        self.out.flush()
        self.drawn, self.shown_at = len(lines), time.monotonic()

    def _priority(self, position_key: tuple[int, str]) -> tuple[int, int]:
        """Running, failed, paused trials in grid order, then the latest finished, then the next pending."""
        position, key = position_key
        status = self.rows[key].status
        rank = SHOWN_FIRST.index(status) if status in SHOWN_FIRST else len(SHOWN_FIRST)
        return rank, -position if status in ("finished", "ended") else position


def _row(status: str, result: dict) -> Row:
    return Row(
        STATUS.get(status, status.lower()),
        int(result.get("epoch", 0)),
        result.get("val_miou"),
        result.get("best_val_miou"),
        result.get("images_per_s"),
    )


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"
