"""Where a long command's logs go: every record to a file, the console keeping what a user acts on.

Ray, Tune and MLflow log their progress at INFO (worker groups started, checkpoints written, database
tables created): useful after the fact, noise beside a sweep's own progress lines.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tqdm import tqdm

# The loggers that print through handlers of their own (they do not propagate to the root), and the least
# level their console handlers still show: ours warn, the libraries' only fail.
CONSOLE_LEVELS = {"": logging.WARNING, "ray": logging.ERROR, "mlflow": logging.ERROR}


def to_file(path: Path) -> None:
    """Write every record at INFO and up to `path` (made with its folders); console handlers keep only
    CONSOLE_LEVELS. Call after importing Ray and MLflow: their handlers are made on import."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in CONSOLE_LEVELS:
        quiet_console(name)
        logging.getLogger(name).addHandler(_Forward(handler))


def quiet_console(name: str) -> None:
    """The console handlers of logger `name` (a key of CONSOLE_LEVELS) keep only its CONSOLE_LEVELS level and
    up: Ray's start lines and token notice are not a command's output. Call after importing the library."""
    for console in logging.getLogger(name).handlers:
        console.setLevel(max(console.level, CONSOLE_LEVELS[name]))


class _Forward(logging.Handler):
    """Hands records to another handler. ray.init gives every handler of Ray's logger Ray's format; the
    file's own keeps one format for all lines."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class Progress:
    """Progress over `total` items: a tqdm bar on a terminal; elsewhere about ten INFO lines of `logger`
    ("<desc> 120/1000 <unit>s"), not one per batch."""

    def __init__(self, total: int, desc: str, unit: str, logger: logging.Logger) -> None:
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
        self.total, self.desc, self.unit, self.logger = total, desc, unit, logger
        self.done, self.every = 0, max(1, math.ceil(total / 10))

    def update(self, n: int) -> None:
        self.bar.update(n)
        before, self.done = self.done, self.done + n
        if self.bar.disable and (self.done // self.every > before // self.every or self.done == self.total):
            self.logger.info("%s %d/%d %ss", self.desc, self.done, self.total, self.unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
