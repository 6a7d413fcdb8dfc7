"""The Ray a sweep runs on: joining the cluster (or starting a local Ray), what a trial's driver holds, the
kind of its GPUs, and what the cluster can never run as asked (grid points it cannot place; storage or
MLflow on one disk)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs
import ray

from orchestrator.execution.ray_private import ON_HEAD, send_worker_output
from orchestrator.gpus import GPUS, kind_of
from orchestrator.spec import ResourcesSpec, Spec, SpecError, Trial
from orchestrator.storage import url_to_fs

log = logging.getLogger(__name__)

# Environment every Ray process of a sweep gets. OpenMP's default busy-wait made CPU steps 10-25x
# slower on shared cores; Ray Train's 2 s default health-check interval blocks each report ~2 s.
# Tune's default TensorBoard logger imports tensorboardX, and it torch, into the sweep's driver: after
# pyarrow's S3 client (Tune's storage on s3://) that import died there (oneMKL "Cannot load libtorch_cpu.so",
# exit 139) under `ray job submit`; the sweep adds Tune's CSV and JSON loggers itself.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}

# What a trial's driver holds. Its work is waiting on its workers, so it takes no CPU: a driver holding one
# (even Tune's 0.01) left a plain 2-CPU head no room for a trial's 2 one-CPU workers, and Ray Train waited for
# them forever. It runs on the head, as Ray Train's controller then does (on the driver's node): a worker
# node lost took a driver placed there with it, and the trial failed instead of restarting its workers.
DRIVER_RESOURCES = {"cpu": 0, **ON_HEAD}


def init_ray(worker_output_to_log: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray.
    address="local" avoids silently joining (or hanging on) a stale `ray start` head.
    worker_output_to_log: what the workers print goes to the logger orchestrator.workers (at INFO), not to
    the console."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
    else:
        # Ray Train watches the nodes of each worker group for preemption (spot instances): a Ray this
        # process starts has no node to lose, so that is one actor process fewer to start per trial.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # The dashboard (and its job API) answers on loopback only; Ray 2.60 adds token auth.
        ray.init(address="local", runtime_env={"env_vars": env}, dashboard_host="127.0.0.1")
    if worker_output_to_log:
        send_worker_output(logging.getLogger("orchestrator.workers").info)


def check_cluster(spec: Spec, trials: list[Trial], tracking_uri: str) -> None:
    """Refuse, once joined and before MLflow is contacted or a trial starts, a sweep the cluster can never
    run as asked: checkpoints or MLflow runs that would land on one node's disk of many, and grid points no
    set of the current nodes can place (every point is checked: the grid may vary resources)."""
    nodes = alive_nodes()
    problems = _unshared(spec, tracking_uri, len(nodes)) if len(nodes) > 1 else []
    autoscaling = os.environ.get("RAY_ADDRESS") and spec.resources.wait_for_nodes
    for trial in trials:
        reasons = unplaceable(trial.spec.resources, nodes)
        if not reasons:
            continue
        r = trial.spec.resources
        problem = f"resources: a trial of {r.workers_per_trial} workers needs " + ", ".join(reasons)
        if trial.key != "base":
            problem += f" (grid point {trial.key})"
        if autoscaling:
            log.warning("%s: it waits until the cluster grows (resources.wait_for_nodes)", problem)
            continue
        problems.append(
            f"{problem}: lower resources.workers_per_trial, cpus_per_worker or gpus_per_worker, add nodes, "
            "or, on an autoscaling cluster, set resources.wait_for_nodes: true"
        )
    if problems:
        raise SpecError(problems)


def alive_nodes() -> list[dict[str, float]]:
    """The Ray resources of each node alive in the joined cluster."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def gpu_kind(nodes: list[dict[str, float]]) -> str | None:
    """The gpus.GPUS kind of these nodes' GPUs, by the accelerator_type Ray gives a GPU node; where kinds
    differ, the one with the least memory (a trial may land on any). None when no node has a GPU of a kind
    GPUS knows (an autoscaling cluster may have none yet)."""
    types = {key.split(":", 1)[1] for node in nodes for key in node if key.startswith("accelerator_type:")}
    kinds = {kind_of(t) for t in types}
    if None in kinds:
        log.warning("GPU kinds %s: not all known to orchestrator/gpus.py; pass --gpu", sorted(types))
    return min(kinds - {None}, key=lambda kind: GPUS[kind].memory_gib, default=None)


def unplaceable(r: ResourcesSpec, nodes: list[dict[str, float]]) -> list[str]:
    """Why a trial's workers can never be placed on these nodes (each a dict of its Ray resources), or [].
    Every worker's bundle must fit on one node, whatever the cluster's sum; a trial's driver holds no CPU or
    GPU (DRIVER_RESOURCES), so the workers' bundles are what it needs."""
    bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    # Identical bundles: a node holds as many as its scarcest resource allows (the epsilon absorbs float
    # division, e.g. 0.3 GPU).
    held = [min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in bundle.items()) for node in nodes]
    n = r.workers_per_trial
    reasons = []
    if sum(held) < n:
        needs = ", ".join(f"{k} {v:g}" for k, v in bundle.items())
        reasons.append(f"{n} worker{'s' * (n > 1)} of {needs} (the nodes hold {sum(held)} of them)")
    holders = sum(h > 0 for h in held)
    if r.placement == "strict_spread" and holders < n:
        reasons.append(
            f"{n} nodes for placement strict_spread ({holders} node{'s' * (holders != 1)} can hold a worker)"
        )
    return reasons


def node_local(uri: str) -> bool:
    """Whether a storage or MLflow URI names a place on one node: a path, file://, local://, memory://
    (one process's) or a SQLite file. `databricks`, MLflow's one bare-word remote, is not."""
    return uri != "databricks" and urlsplit(uri).scheme in ("", "file", "local", "memory", "sqlite")


def _unshared(spec: Spec, tracking_uri: str, nodes: int) -> list[str]:
    """On a cluster of many nodes, rank 0 may run on any node: what it writes must reach the head."""
    many = f"and the cluster has {nodes} nodes"
    shared = "or, if every node mounts it, set storage_shared: true"
    where = "./runs (the default)" if spec.storage is None else repr(spec.storage)
    problems = []
    if spec.storage and urlsplit(spec.storage).scheme == "memory":
        problems.append(
            f"storage: {where} is in one process's memory, {many}: use an object store URI (s3://bucket/path)"
        )
    elif node_local(storage(spec)) and not spec.storage_shared:
        problems.append(
            f"storage: {where} is on this node's disk, {many}: trials on other nodes would checkpoint to "
            f"their own disks. Use an object store URI (s3://bucket/path), {shared}"
        )
    if node_local(tracking_uri) and not spec.storage_shared:
        problems.append(
            f"MLFLOW_TRACKING_URI: {tracking_uri!r} is on this node's disk, {many}: runs logged on other "
            f"nodes would not reach it. Use an MLflow server (http://host:5000), {shared}"
        )
    return problems


def storage(spec: Spec) -> str:
    """Ray Train checkpoints and Tune state: the spec's URI, else ./runs (absolute: Ray needs it)."""
    return spec.storage or str(Path("runs").resolve())


# Storage schemes Ray reaches with pyarrow's own clients, as by default (pyarrow.fs.FileSystem.from_uri).
PYARROW_SCHEMES = ("", "file", "s3")


def ray_storage(uri: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """(storage_filesystem, storage_path) for Ray Train's and Tune's RunConfig and Tuner.restore.

    A local path and s3:// are left to Ray. Any other scheme becomes a filesystem through url_to_fs, as the
    data does: pyarrow has no az://, wants the account inside abfs:// URLs and configures its GCS client
    apart from gcsfs, so through fsspec the checkpoints and the data take one driver, one configuration
    (credentials, an emulator's endpoint) and one missing-driver error: a scheme without its driver fails
    here, in one line (errors.Unavailable)."""
    if urlsplit(uri).scheme in PYARROW_SCHEMES:
        return None, uri
    fs, path = url_to_fs(uri)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
