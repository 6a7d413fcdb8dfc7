"""How a Tune scheduler's decision to stop a trial reaches the trial's DDP ranks, so that they end together.

Tune stops a trial by stopping its driver's actor: the Ray Train controller and workers it owns would die
with it, mid-step, their MLflow run left running (ray-project/ray#21848). Instead the sweep's scheduler
(execution/schedulers.py) asks, through one actor of the sweep (`StopRequests`), and lets the trial go on;
each rank polls its request at every step without waiting (train/stopping.py) and, through the step's
all-reduce, every rank ends at the same step (train/loop.py). The trial's driver then returns as for a
finished trial, and Tune frees its slot.

Ray only: imported by the sweep and the trials' drivers.
"""

from __future__ import annotations

import asyncio
import hashlib

import ray

from orchestrator.execution.ray_private import ON_HEAD


@ray.remote(num_cpus=0)
class StopRequests:
    """The sweep's stop requests, by trial key; an async actor, so that a wait holds no thread."""

    def __init__(self) -> None:
        self._asked: dict[str, asyncio.Event] = {}
        self._reasons: dict[str, str] = {}

    def _event(self, key: str) -> asyncio.Event:
        return self._asked.setdefault(key, asyncio.Event())

    async def ask(self, key: str, reason: str) -> None:
        self._reasons.setdefault(key, reason)
        self._event(key).set()

    async def wait(self, key: str) -> str:
        """Returns, with the reason, once the trial `key` is asked to stop."""
        await self._event(key).wait()
        return self._reasons[key]


def stop_requests(sweep: str) -> ray.actor.ActorHandle:
    """The stop requests of the sweep whose Tune experiment is at `sweep` (a path or URL): created by the
    first process to ask (the sweep's, which holds it until its trials end), found by the others; on the
    head, as the trial slots."""
    name = "orchestrator-stops-" + hashlib.sha1(sweep.encode()).hexdigest()[:12]
    return StopRequests.options(name=name, get_if_exists=True, resources=ON_HEAD).remote()


def ask_to_stop(sweep: str, key: str, reason: str) -> None:
    """Ask the ranks of the trial `key` of the sweep at `sweep` to stop, for `reason`."""
    ray.get(stop_requests(sweep).ask.remote(key, reason), timeout=60)
