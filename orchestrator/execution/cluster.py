"""The Ray a sweep runs on: joining the cluster (or starting a local Ray), what a trial's driver holds, and
whether a trial can ever be placed on the cluster's resources."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from orchestrator.errors import UsageError
from orchestrator.spec import ResourcesSpec, Spec, Trial

log = logging.getLogger(__name__)

# Environment every Ray process of a sweep gets. OpenMP's default busy-wait made CPU steps 10-25x
# slower on shared cores; Ray Train's 2 s default health-check interval blocks each report ~2 s.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

# A custom resource, one per concurrent trial: what trial drivers hold instead of CPUs.
DRIVER_SLOT = "trial_driver"


def init_ray(spec: Spec) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray.
    address="local" avoids silently joining (or hanging on) a stale `ray start` head."""
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
        slots = {DRIVER_SLOT: spec.resources.max_concurrent_trials}
        # The dashboard (and its job API) answers on loopback only; Ray 2.60 adds token auth.
        ray.init(address="local", runtime_env={"env_vars": env}, resources=slots, dashboard_host="127.0.0.1")


def check_fits(trials: list[Trial]) -> None:
    """A trial that can never be placed would wait forever: on a local Ray, say so and stop; on a cluster
    (whose autoscaler may add nodes), warn. Every grid point is checked (the grid may vary resources)."""
    points = (trial.spec.resources for trial in trials)
    for r in {r.model_dump_json(): r for r in points}.values():
        _check_resources(r)


def _check_resources(r: ResourcesSpec) -> None:
    have = ray.cluster_resources()
    needs = {"CPU": r.workers_per_trial * r.cpus_per_worker, "GPU": r.workers_per_trial * r.gpus_per_worker}
    short = [
        f"{k} {v:g} (the cluster has {have.get(k, 0):g})" for k, v in needs.items() if v > have.get(k, 0)
    ]
    nodes = sum(node["Alive"] for node in ray.nodes())
    if r.placement == "strict_spread" and nodes < r.workers_per_trial:
        short.append(f"{r.workers_per_trial} nodes for placement strict_spread (the cluster has {nodes})")
    if not short:
        return
    problem = f"a trial of {r.workers_per_trial} workers needs " + ", ".join(short)
    if not os.environ.get("RAY_ADDRESS"):
        raise UsageError(
            f"{problem}: lower resources.workers_per_trial, cpus_per_worker or gpus_per_worker, "
            "or run on a cluster"
        )
    log.warning("%s: trials wait until the cluster grows", problem)


def driver_resources() -> dict[str, float]:
    """What a trial driver holds. Its work is waiting on its workers, so it takes a driver slot and
    no CPU: a driver holding a CPU left 2-core machines with no room for the 2 workers (Ray waits
    forever). Tune refuses an empty request, so clusters without slots give it a sliver of CPU."""
    if ray.cluster_resources().get(DRIVER_SLOT):
        return {"CPU": 0, DRIVER_SLOT: 1}
    return {"CPU": 0.01}


def storage(spec: Spec) -> str:
    """Ray Train checkpoints and Tune state: the spec's URI, else ./runs (absolute: Ray needs it)."""
    return spec.storage or str(Path("runs").resolve())
