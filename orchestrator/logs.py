"""Where a long command's logs go: every record to a file, the console keeping what a user acts on.

Ray, Tune and MLflow log their progress at INFO (worker groups started, checkpoints written, database
tables created): useful after the fact, noise beside a sweep's own progress lines.
"""

from __future__ import annotations

import logging
from pathlib import Path

# The loggers that print through handlers of their own (they do not propagate to the root), and the least
# level their console handlers still show: ours warn, the libraries' only fail.
CONSOLE_LEVELS = {"": logging.WARNING, "ray": logging.ERROR, "mlflow": logging.ERROR}


def to_file(path: Path) -> None:
    """Write every record at INFO and up to `path` (made with its folders); console handlers keep only
    CONSOLE_LEVELS. Call after importing Ray and MLflow: their handlers are made on import."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name, level in CONSOLE_LEVELS.items():
        logger = logging.getLogger(name)
        for console in logger.handlers:
            console.setLevel(max(console.level, level))
        logger.addHandler(_Forward(handler))


class _Forward(logging.Handler):
    """Hands records to another handler. ray.init gives every handler of Ray's logger Ray's format; the
    file's own keeps one format for all lines."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)
