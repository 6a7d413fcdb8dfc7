"""Every use of Ray's private API, in one module, written for the Ray versions in SUPPORTED and checked
against the installed one on import: a Ray upgrade fails here, naming the range, not deep inside a trial.

What is taken, and why:
- `get_address_and_port`, `build_address`: rank 0's node address and a free port, found as Ray's own torch
  backend finds them, to open the process group (trainer.ProcessGroup).
- `TrainingFramework`: what a BackendConfig says it is (Ray Train V2 asks every backend).
- `DataParallelTrainer`, and its `_create_default_callbacks` overridden: Ray Train starts a DatasetManager
  actor for every run, also one without Ray Datasets (ours stream through fsspec): one more Python process
  per trial on the way to its first step. `TrainerWithoutDatasets` drops it.
- `HEAD_NODE_RESOURCE_NAME`: the resource only the head node has (Ray pins its own state actors with a
  sliver of it); trial drivers and the sweep's actors hold one too (`ON_HEAD`), so that no worker host
  lost or drained takes them down.
- `global_worker_stdstream_dispatcher`: where a driver receives its workers' stdout and stderr. Ray's one
  public choice is all of it on the console or none of it anywhere near the run (`log_to_driver`);
  `send_worker_output` writes it to the sweep's log file instead, the autoscaler's status reports cut to
  their events by `filter_autoscaler_events`, as Ray's printer does.
- a worker's own preemption notice (`get_train_context().preemption_context`): what the public
  `ray.train.get_preemption_info()` reads and then agrees on through a Ray actor, a round trip per call;
  the training loop asks every step, and agrees through the step's own all-reduce instead (`notice_left_s`).
- the storage context's `persist_current_checkpoint`: Ray Train's own copy of a checkpoint folder to
  storage, called from an upload function of `ray.train.report` (`persist_checkpoint`), so that a background
  upload writes the checkpoint's files first, off the training step, then stores them as Ray would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from orchestrator.errors import check_version

SUPPORTED = ((2, 60), (2, 61))  # [from, to): the releases this module was written and tested against


def check_ray_version(version: str = ray.__version__) -> None:
    """UsageError unless `version` is in SUPPORTED."""
    check_version(
        "Ray", version, SUPPORTED, "uses Ray's private API", "orchestrator/execution/ray_private.py"
    )


check_ray_version()

from ray._common.constants import HEAD_NODE_RESOURCE_NAME  # noqa: E402
from ray._common.network_utils import build_address  # noqa: E402
from ray._private.ray_logging import global_worker_stdstream_dispatcher  # noqa: E402
from ray._private.worker import filter_autoscaler_events  # noqa: E402
from ray.train._internal.utils import get_address_and_port  # noqa: E402
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback  # noqa: E402
from ray.train.v2._internal.execution.context import get_train_context  # noqa: E402
from ray.train.v2._internal.util import TrainingFramework  # noqa: E402
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # noqa: E402

ON_HEAD = {HEAD_NODE_RESOURCE_NAME: 0.001}  # a sliver of the head's own resource: placed on the head

__all__ = [
    "ON_HEAD",
    "SUPPORTED",
    "TrainerWithoutDatasets",
    "TrainingFramework",
    "rank_zero_url",
    "check_ray_version",
    "notice_left_s",
    "persist_checkpoint",
    "send_worker_output",
]

_RAY_PRINTER = "ray_print_logs"  # the name ray.init gives its console printer of worker output
_OUR_PRINTER = "orchestrator_worker_output"


def rank_zero_url(worker_group) -> str:
    """tcp://address:port on rank 0's node, a free port there: where the process group meets."""
    return f"tcp://{build_address(*worker_group.execute_single(0, get_address_and_port))}"


class TrainerWithoutDatasets(DataParallelTrainer):
    """Ray Train's data-parallel trainer without the DatasetManager actor it starts for every run."""

    def _create_default_callbacks(self) -> list:
        return [c for c in super()._create_default_callbacks() if not isinstance(c, DatasetsCallback)]


def send_worker_output(write: Callable[[str], None]) -> None:
    """Hand each line the workers print to `write` (prefixed like Ray's console lines: actor or task name,
    pid, ip), instead of Ray's console printer. Call after ray.init(log_to_driver=True)."""

    def emit(batch: dict[str, Any]) -> None:
        lines = batch.get("lines", [])
        if batch.get("pid") == "autoscaler":  # its status reports: only their events, as Ray prints them
            lines = filter_autoscaler_events(lines)
        who = [batch.get("actor_name") or batch.get("task_name"), f"pid={batch.get('pid')}", batch.get("ip")]
        prefix = "(" + " ".join(str(part) for part in who if part) + ")"
        for line in lines:
            write(f"{prefix} {line}")

    for name in (_RAY_PRINTER, _OUR_PRINTER):
        global_worker_stdstream_dispatcher.remove_handler(name)
    global_worker_stdstream_dispatcher.add_handler(_OUR_PRINTER, emit)


def notice_left_s(now_ms: float) -> float | None:
    """Seconds this Ray Train worker has left before its group's preempted node goes (inf when the drain
    named no deadline); None while no preemption notice has come. Ray's watcher marks every worker of the
    group, so each rank reads its own."""
    info = get_train_context().preemption_context.preemption_info
    if info is None:
        return None
    return float("inf") if info.deadline_ms is None else (info.deadline_ms - now_ms) / 1000


def persist_checkpoint(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
    """Store a worker's checkpoint folder as `ray.train.report` does without an upload function: under the
    run's storage, as `dir_name`; the stored checkpoint."""
    return get_train_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
