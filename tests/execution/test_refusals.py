"""Refusals before anything runs: a sweep on a cluster of many nodes whose checkpoints or MLflow store would
land on one node's disk, and a grid point the cluster's nodes can never place, exit 2 naming the field,
after joining the cluster and before MLflow is contacted or a trial starts."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.execution.cluster import gpu_kind, node_local, unplaceable
from orchestrator.spec import ResourcesSpec as R

CLI = [sys.executable, "-m", "orchestrator"]


NODE_4CPU = {"CPU": 4.0, "memory": 8e9}
NODE_8CPU_2GPU = {"CPU": 8.0, "GPU": 2.0, "memory": 8e9}


def test_workers_are_placed_node_by_node_not_against_the_clusters_sum() -> None:
    # 2 nodes of 4 CPUs: 8 in all, but a 3-CPU worker fits once per node.
    nodes = [NODE_4CPU, NODE_4CPU]
    assert unplaceable(R(workers_per_trial=2, cpus_per_worker=3), nodes) == []
    (reason,) = unplaceable(R(workers_per_trial=3, cpus_per_worker=2.5), nodes)
    assert reason == "3 workers of CPU 2.5 (the nodes hold 2 of them)"
    (reason,) = unplaceable(R(workers_per_trial=1, cpus_per_worker=5), nodes)
    assert reason == "1 worker of CPU 5 (the nodes hold 0 of them)"


def test_a_worker_needs_every_resource_it_asks_for_on_one_node() -> None:
    nodes = [NODE_4CPU, NODE_8CPU_2GPU]
    # GPUs only on the second node: 2 workers of 1 GPU and 4 CPUs fit there.
    assert unplaceable(R(workers_per_trial=2, cpus_per_worker=4, gpus_per_worker=1), nodes) == []
    (reason,) = unplaceable(R(workers_per_trial=3, cpus_per_worker=1, gpus_per_worker=1), nodes)
    assert reason == "3 workers of CPU 1, GPU 1 (the nodes hold 2 of them)"
    # Fractions: 0.3 GPU, three on each of 2 GPUs; the spec takes them for trials of one worker.
    assert unplaceable(R(workers_per_trial=1, cpus_per_worker=2, gpus_per_worker=0.3), nodes) == []


def test_strict_spread_needs_a_node_for_each_worker() -> None:
    nodes = [NODE_4CPU, NODE_8CPU_2GPU]
    assert unplaceable(R(workers_per_trial=2, placement="strict_spread"), nodes) == []
    reasons = unplaceable(R(workers_per_trial=3, placement="strict_spread"), nodes)
    assert reasons == ["3 nodes for placement strict_spread (2 nodes can hold a worker)"]
    reasons = unplaceable(R(workers_per_trial=2, gpus_per_worker=1, placement="strict_spread"), nodes)
    assert reasons == ["2 nodes for placement strict_spread (1 node can hold a worker)"]


def test_the_clusters_gpu_kind_is_read_from_rays_accelerator_types(caplog) -> None:
    def node(kind: str) -> dict[str, float]:
        return {"CPU": 8.0, "GPU": 1.0, f"accelerator_type:{kind}": 1.0}

    assert gpu_kind([NODE_4CPU]) is None
    assert gpu_kind([NODE_4CPU, node("H100")]) == "h100"
    assert gpu_kind([node("H100"), node("A10G")]) == "a10g"  # a trial may land on the smaller
    assert gpu_kind([node("A100")]) == "a100-40gb"  # Ray names both sizes A100: the smaller
    assert gpu_kind([node("T4")]) is None and "T4" in caplog.text
    assert gpu_kind([node("T4"), node("L4")]) == "l4"


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("/data/runs", True),
        ("runs", True),
        ("file:///data/runs", True),
        ("local:///data/runs", True),
        ("memory://runs", True),
        ("sqlite:///data/mlflow.db", True),
        ("s3://bucket/runs", False),
        ("gs://bucket/runs", False),
        ("http://mlflow:5000", False),
        ("https://mlflow.example", False),
        ("databricks", False),
    ],
)
def test_node_local_uris(uri: str, local: bool) -> None:
    assert node_local(uri) is local


@pytest.fixture
def tripwire() -> Iterator[tuple[str, list]]:
    """An address that records every connection made to it: MLflow's, if anything contacts it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    server.close()


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[str]:
    """A cluster of two 1-CPU nodes (raylets of one machine: what the refusals check is the node count)."""
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short and private, as conftest's cli_env
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", ray_tmp)
        env.delenv("RAY_ADDRESS", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        # A GPU in name only (Ray counts it; nothing runs on it): the sweep reads the cluster's GPU kind.
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A10G": 1})
        cluster.wait_for_nodes()
        yield cluster.address
        cluster.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("storage", "shared", "tracking", "error"),
    [
        (None, False, "mlflow", "error: storage: ./runs (the default) is on this node's disk"),
        ("{tmp}/runs", False, "mlflow", "error: storage: '{tmp}/runs' is on this node's disk"),
        ("memory://runs", True, "mlflow", "error: storage: 'memory://runs' is in one process's memory"),
        ("s3://bucket/runs", False, "sqlite", "error: MLFLOW_TRACKING_URI: 'sqlite:///{tmp}/mlflow.db'"),
        ("{tmp}/runs", True, "mlflow", "error: resources: a trial of 2 workers needs 2 workers of CPU 2"),
    ],
)
def test_a_sweep_on_many_nodes_refuses_before_mlflow_or_a_trial(
    two_nodes: str, tripwire, tmp_path: Path, storage, shared, tracking, error
) -> None:
    mlflow, contacts = tripwire
    spec = {
        "name": "refused",
        "data": {"train": "shards/train", "val": "shards/val"},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "grid": {"resources.cpus_per_worker": [1, 2]},  # the 2-CPU point fits on no 1-CPU node
    }
    if storage:
        spec["storage"] = storage.format(tmp=tmp_path)
    if shared:
        spec["storage_shared"] = True
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = mlflow if tracking == "mlflow" else f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "RAY_ADDRESS": two_nodes, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [*CLI, "sweep", "spec.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error.format(tmp=tmp_path) in proc.stderr
    assert contacts == []
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gpus", "batches", "errors"),
    [
        (
            1,
            [2, 4096],
            [
                "error: 1 of 2 grid points do not fit the memory their workers hold by `orchestrator plan`",
                "error:   train.batch_per_gpu=4096: ",
            ],
        ),
        (
            0.25,  # of 22.5 GiB, less 10%: 5.06 GiB, less than the estimate at batch 4 (7.3 GiB)
            [2, 4],
            [
                "error: 1 of 2 grid points do not fit the memory their workers hold",
                "error:   train.batch_per_gpu=4: ",
                "at batch 4; 0.25 of a GPU of 22.5 GiB holds 5.1 GiB (its share less 10%, kept free)",
            ],
        ),
        (
            0,
            [2, "auto"],
            ["error: train.batch_per_gpu: auto is chosen for a GPU's memory; a trial on the CPU"],
        ),
    ],
    ids=["unfit-on-the-clusters-gpus", "packed-beyond-its-share", "auto-on-the-cpu"],
)
def test_points_that_cannot_fit_the_clusters_gpus_are_refused_before_mlflow_or_a_trial(
    two_nodes: str, tripwire, tmp_path: Path, gpus, batches, errors
) -> None:
    """The GPU kind comes from the joined cluster (its A10G node); no --gpu is given."""
    mlflow, contacts = tripwire
    spec = {
        "name": "refused",
        "data": {"train": "shards/train", "val": "shards/val"},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus},
        "storage_shared": True,
        "storage": str(tmp_path / "runs"),
        "grid": {"train.batch_per_gpu": batches},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": two_nodes, "MLFLOW_TRACKING_URI": mlflow}
    proc = subprocess.run(
        [*CLI, "sweep", "spec.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    for error in errors:
        assert error in proc.stderr
    assert contacts == []


@pytest.mark.slow
def test_a_worker_on_the_cpu_beyond_its_nodes_memory_is_refused_before_mlflow_or_a_trial(
    two_nodes: str, tripwire, tmp_path: Path
) -> None:
    mlflow, contacts = tripwire
    spec = {
        "name": "refused",
        "data": {"train": "shards/train", "val": "shards/val"},
        "train": {"crop": [16384, 16384]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "storage_shared": True,
        "storage": str(tmp_path / "runs"),
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": two_nodes, "MLFLOW_TRACKING_URI": mlflow}
    proc = subprocess.run(
        [*CLI, "train", "spec.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: 1 of 1 grid points do not fit the memory their workers hold" in proc.stderr
    assert re.search(
        r"error:   base: [\d.]+ GiB per worker at batch 2; 1 of the 1 CPUs of a node of", proc.stderr
    )
    assert contacts == []


@pytest.mark.slow
def test_plan_without_gpu_reads_the_kind_of_the_cluster_at_ray_address(
    two_nodes: str, tmp_path: Path
) -> None:
    spec = {
        "name": "planned",
        "data": {"train": "shards/train", "val": "shards/val"},
        "train": {"crop": [64, 64]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": two_nodes, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    argv = [*CLI, "plan", "spec.yaml", "--train-images", "10"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 trials on a10g (22.5 GiB): 0 do not fit" in proc.stdout
    assert "Connecting to existing Ray cluster" not in proc.stderr  # Ray's console lines: quieted
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: --gpu: name the GPUs' kind (v100-16gb, a10g," in proc.stderr
