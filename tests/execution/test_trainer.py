"""A Ray Train run through `orchestrator.execution.trainer` on a local Ray: the workers train over a real gloo
group, torch stays out of Ray Train's controller, and Ray Data's actor is never started.

torch is imported inside the functions Ray runs: this module travels by value to the workers and the
controller, and its own imports must not count as theirs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig, UserCallback

from orchestrator.execution.trainer import Trainer

pytestmark = pytest.mark.slow

WATCHED = ["torch", "ray.train.torch", "orchestrator.train.loop"]


def _all_reduce_ranks(config: dict) -> dict:
    import torch
    import torch.distributed as dist

    total = torch.tensor([ray.train.get_context().get_world_rank() + 1.0])
    dist.all_reduce(total)
    ray.train.report({"total": total.item()})  # the controller's callback runs on reports
    return {"total": total.item(), "world": dist.get_world_size(), "backend": dist.get_backend()}


class _ControllerModules(UserCallback):
    """Runs in Ray Train's controller: writes which of WATCHED it has imported by the first report."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        Path(self.path).write_text(json.dumps([m for m in WATCHED if m in sys.modules]))


def test_a_run_trains_over_a_gloo_group_with_torch_on_the_workers_alone(cli_env, tmp_path: Path) -> None:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        result = Trainer(
            _all_reduce_ranks,
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(
                storage_path=str(tmp_path / "runs"), callbacks=[_ControllerModules(str(tmp_path / "modules"))]
            ),
        ).fit()
        # Ray's public state API needs the dashboard, which this Ray does not start: its internal table.
        actors = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.return_value == {"total": 3.0, "world": 2, "backend": "gloo"}
    assert json.loads((tmp_path / "modules").read_text()) == []
    assert "TrainController" in actors and "DatasetManager" not in actors, actors
