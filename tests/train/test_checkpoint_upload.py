"""Checkpoints written and stored off the training step, through a real Ray Train run on a local Ray: each
checkpoint takes WRITE_S to write and its storage UPLOAD_S to take. One reported in the background returns
before it is written, the next one waits for it to be stored, one reported on the step returns once
stored, and every one lands, in order, with no local copy left behind.

The storage filesystem and the training function travel by value to Ray's processes (see test_trainer)."""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import pyarrow.fs
import pytest
import ray
from fsspec.implementations.local import LocalFileSystem
from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig

from orchestrator import spec as specs
from orchestrator.execution.trainer import Trainer
from orchestrator.train.loop import upload_in_background

UPLOAD_S = 2.0
WRITE_S = 1.0


class SlowStore(pyarrow.fs.FSSpecHandler):
    """A local folder that takes UPLOAD_S to take each checkpoint file (Ray's own files go at once)."""

    def open_output_stream(self, path, metadata):
        if "/checkpoint_" in path:
            time.sleep(UPLOAD_S)
        return super().open_output_stream(path, metadata)


def _three_checkpoints(config: dict) -> dict:
    from orchestrator.execution.ray_private import persist_checkpoint
    from orchestrator.train.checkpoint_upload import CheckpointUploads

    def write(i: int, folder: Path) -> None:
        time.sleep(WRITE_S)
        (folder / "i").write_text(str(i))

    uploads, took = CheckpointUploads(persist_checkpoint), []
    for i, background in enumerate(config["background"]):
        started = time.monotonic()
        uploads.report({"i": i}, partial(write, i), background)
        took.append(time.monotonic() - started)
    return {"took": took, "waited": uploads.waited_s}


def _fit(tmp_path: Path, background: list[bool]):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    local = tmp_path / "local"  # the worker's temporary folder: where its checkpoints are written first
    local.mkdir()
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"TMPDIR": str(local)}})  # fmt: skip
    try:
        store = pyarrow.fs.PyFileSystem(SlowStore(LocalFileSystem()))
        return local, Trainer(
            _three_checkpoints,
            train_loop_config={"background": background},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(storage_path=str(tmp_path / "runs"), storage_filesystem=store, name="up"),
        ).fit()
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_background_uploads_leave_the_step_one_in_flight_and_all_land_in_order(tmp_path: Path) -> None:
    local, result = _fit(tmp_path, [True, True, False])
    took, one = result.return_value["took"], WRITE_S + UPLOAD_S
    # 0: back at once; 1: waits for 0 to be written and stored; 2 (on the step): for 1, then for itself.
    assert took[0] < WRITE_S / 2, took
    assert one * 0.7 < took[1] < one * 1.5, took
    assert took[2] > one * 1.7, took
    assert result.return_value["waited"] > one * 1.4
    stored = sorted((tmp_path / "runs" / "up").glob("checkpoint_*/i"), key=lambda f: f.parent.name)
    assert [f.read_text() for f in stored] == ["0", "1", "2"]
    assert result.checkpoint.path.endswith(stored[-1].parent.name)  # the last reported is the latest
    assert list(local.glob("orchestrator-checkpoint-*")) == []


@pytest.mark.parametrize(
    ("setting", "epoch_end", "preempted", "background"),
    [
        ("background", False, False, True),  # an interval checkpoint
        ("background", True, False, False),  # its metrics go to MLflow once it is stored
        ("background", False, True, False),  # the node must not go before it is stored
        ("sync", False, False, False),
    ],
)
def test_only_interval_checkpoints_upload_in_the_background(setting, epoch_end, preempted, background):
    raw = {"name": "up", "data": {"train": "t", "val": "v"}, "train": {"checkpoint_upload": setting}}
    spec = specs.validate(raw)
    assert upload_in_background(spec.train, epoch_end=epoch_end, preempted=preempted) is background
