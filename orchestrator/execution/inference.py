"""An inference pass (inference/parts.py) on Ray workers: each loads the members once, on a GPU of its own
where it holds one, and runs parts of whole batches as they are handed out; the parts come back in order,
so the merged result is what one process computes. A worker lost with its node is restarted elsewhere
and its part run again."""

from __future__ import annotations

import logging

import ray
from ray.util import ActorPool

from orchestrator import logs
from orchestrator.errors import UsageError
from orchestrator.execution.cluster import init_ray
from orchestrator.inference.parts import Part, PartsRunner, Pass

log = logging.getLogger(__name__)

PARTS_PER_WORKER = 4  # a lost worker costs a quarter of its share; the bar moves four times per worker


@ray.remote(max_restarts=-1, max_task_retries=-1)
class _Worker:
    """Loads the members at its first part. The pass comes wrapped in a list, so Ray hands over the
    reference, not the value: a restarted worker fetches it again from the driver, which holds it (Ray
    warns that constructor arguments in the object store may be lost to a restart)."""

    def __init__(self) -> None:
        self.job, self.members = None, None

    def run(self, shared: list[ray.ObjectRef], part: tuple[int, int]) -> Part:
        if self.job is None:
            self.job = ray.get(shared[0])
            self.members = self.job.load()
        return self.job.run(self.members, part)


def on_ray(workers: int, gpus_per_worker: float | None = None) -> PartsRunner:
    """A pass's parts on `workers` Ray workers of `gpus_per_worker` GPUs each (run_parts), for run_pass."""

    def runner(job: Pass, progress: logs.Progress) -> list[Part]:
        return run_parts(job, workers, gpus_per_worker, progress)

    return runner


def run_parts(job: Pass, workers: int, gpus_per_worker: float | None, progress: logs.Progress) -> list[Part]:
    """The pass's parts, in order, from `workers` Ray workers of `gpus_per_worker` GPUs each (default:
    one where the cluster has GPUs and the device is not cpu, else none)."""
    if workers < 1:
        raise UsageError(f"workers {workers}: want 1 or more Ray workers")
    logs.quiet_console("ray")
    init_ray()
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1 if cluster_gpus and job.device != "cpu" else 0
    if job.device == "cuda" and not gpus_per_worker:
        raise UsageError("device 'cuda' with --gpus-per-worker 0: the workers would hold no GPU")
    if gpus_per_worker > cluster_gpus:
        raise UsageError(
            f"gpus-per-worker {gpus_per_worker}: the Ray cluster has {cluster_gpus:g} GPU(s) in all"
        )
    log.info("%d images on %d Ray worker(s) of %g GPU(s)", job.images(), workers, gpus_per_worker)
    shared = ray.put(job)  # one copy of the members' weights in the object store, not one per worker
    actors = [_Worker.options(num_cpus=1, num_gpus=gpus_per_worker).remote() for _ in range(workers)]
    try:
        count = min(job.batches(), workers * PARTS_PER_WORKER)
        parts = []
        for part in ActorPool(actors).map(
            lambda actor, i: actor.run.remote([shared], (i, count)), range(count)
        ):
            parts.append(part)
            progress.update(part.images)
        return parts
    finally:
        for actor in actors:
            ray.kill(actor)
