"""Placement with real Ray: a trial spread over two nodes of a simulated cluster syncs its BN statistics
across them, and a trial that can never fit says so instead of waiting forever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.data.shards import pack
from orchestrator.data.synth import synthesize

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "orchestrator"]


@pytest.fixture
def workdir(tmp_path: Path, cli_env: dict[str, str]):
    env = cli_env
    synthesize(str(tmp_path / "synth"), train=8, val=2, size=(128, 72))
    pack(str(tmp_path / "synth"), str(tmp_path / "shards"), shard_size=4, workers=1)
    spec = {
        "name": "placement",
        "data": {"train": "shards/train", "val": "shards/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "norm": "syncbn",
        "train": {"epochs": 1, "steps_per_epoch": 1, "batch_per_gpu": 2, "crop": [64, 64]},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
        "storage": str(tmp_path / "runs"),
        "storage_shared": True,  # the simulated nodes share this machine's disk (and its SQLite MLflow)
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path, env


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_syncbn_trial_spreads_one_worker_per_node(workdir) -> None:
    from ray.cluster_utils import Cluster

    cwd, env = workdir
    # A head that runs only trial drivers, and two 1-CPU worker nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        proc = run_cli(["train", "spec.yaml"], cwd, {**env, "RAY_ADDRESS": cluster.address})
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    finally:
        cluster.shutdown()
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("placement")
    (trial,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'trial'")
    assert trial.info.status == "FINISHED"
    assert trial.data.tags["orchestrator.nodes"] == "2"
    assert trial.data.params["resources.placement"] == "strict_spread"


def test_a_trial_that_cannot_fit_says_so(workdir) -> None:
    cwd, env = workdir
    proc = run_cli(["train", "spec.yaml", "--set", "resources.workers_per_trial=64"], cwd, env)
    assert proc.returncode == 2
    assert "error: resources: a trial of 64 workers needs 64 workers of CPU 1 (the nodes hold" in proc.stderr
    assert "64 nodes for placement strict_spread (1 node can hold a worker)" in proc.stderr
