"""A worker's checkpoint reports to Ray Train, with the checkpoint written and stored on or off the training
step.

On the step (`background=False`), rank 0 writes the checkpoint's files to a local folder and
`ray.train.report` returns once they are in storage. Off it, the report returns at once: Ray Train's upload
thread (`CheckpointUploadMode.ASYNC`, reports kept in order) writes the files (from a copy of the state
the caller made) and stores them while training goes on, then deletes the folder. At most one checkpoint is
in flight: the next waits for it, so that a store slower than the checkpoints slows training instead of
piling up copies in memory and on the worker's disk. Every rank reports (a barrier); the others with no
files, and nothing to wait for."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
from ray.train import CheckpointUploadMode

log = logging.getLogger(__name__)

_IDLE = object()  # no upload in flight


Persist = Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint]


class CheckpointUploads:
    """One attempt's checkpoint reports. `persist(checkpoint, dir_name)` stores a written folder as Ray Train
    would (execution/ray_private.persist_checkpoint: Ray's private API, handed in). `latest` is what Ray
    Train holds as the last stored checkpoint (a new object once an upload lands): how the next checkpoint
    learns that the one before it is stored."""

    def __init__(
        self, persist: Persist, latest: Callable[[], Any] = ray.train.get_checkpoint, poll_s: float = 0.05
    ) -> None:
        self._persist, self._latest, self._poll_s = persist, latest, poll_s
        self._before: Any = _IDLE  # while one is in flight: the latest stored checkpoint when it was reported
        self.waited_s = 0.0  # how long checkpoints waited for the upload before theirs, in all
        self._said = False  # that a checkpoint waited long: once an attempt

    def report(
        self, metrics: dict[str, Any], write: Callable[[Path], None] | None = None, background: bool = False
    ) -> None:
        """Report `metrics` and, where `write` is given (rank 0), the checkpoint it writes into a folder: in
        the background, on Ray Train's upload thread."""
        self.wait()
        if write is None:
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix="orchestrator-checkpoint-"))
        handed = False  # to Ray Train, which deletes the folder once the upload is done
        try:
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            if background:
                before = self._latest()
                ray.train.report(
                    metrics,
                    checkpoint=checkpoint,
                    checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                    checkpoint_upload_fn=partial(_write_and_store, self._persist, write, folder),
                )
                handed, self._before = True, before
            else:
                write(folder)
                ray.train.report(metrics, checkpoint=checkpoint)
        finally:
            if not handed:
                shutil.rmtree(folder, ignore_errors=True)

    def wait(self) -> None:
        """Until the upload in flight, if any, is stored. A failed upload never lands: Ray Train fails the
        attempt with its error and ends this worker."""
        if self._before is _IDLE:
            return
        started = time.monotonic()
        while self._latest() is self._before:
            time.sleep(self._poll_s)
        self._before = _IDLE
        waited = time.monotonic() - started
        if waited > 1 and not self._said:
            self._said = True
            log.warning(
                "a checkpoint waited %.1f s for the one before it to be stored: storing one takes longer "
                "than train.checkpoint_every steps, and training waits for it (said once)",
                waited,
            )
        self.waited_s += waited


def _write_and_store(
    persist: Persist,
    write: Callable[[Path], None],
    folder: Path,
    checkpoint: ray.train.Checkpoint,
    dir_name: str,
) -> ray.train.Checkpoint:
    """Ray Train's upload function for a background checkpoint: its files written, then stored."""
    write(folder)
    return persist(checkpoint, dir_name)
