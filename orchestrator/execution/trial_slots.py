"""`resources.max_concurrent_trials`, held by the sweep itself and not by Tune alone.

Tune keeps the limit by not generating a trial while enough of the grid's run, but a restored experiment
puts every errored trial back as pending at once and starts as many as the cluster can place
(ray-project/ray#40652): a resumed sweep ran all its failed trials together. So each trial's driver also
takes one of the sweep's slots (`TrialSlots`, an actor of the sweep's process) before its Ray Train run
starts, and gives it back when the trial ends. A slot is a lease the driver renews while it lives: a driver
killed without giving its slot back loses it when the lease lapses, and no trial waits for it forever.

Ray only: imported by the sweep and the trials' drivers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from orchestrator.execution.ray_private import ON_HEAD

log = logging.getLogger(__name__)

LEASE_S = 60.0  # a slot whose holder has not renewed it for this long is free again
RENEW_S = 10.0
WAIT_S = 2.0  # between tries for a slot


class Leases:
    """`count` slots: leases by holder (a trial's key), each until its expiry."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._expiry: dict[str, float] = {}

    def take(self, holder: str) -> bool:
        """Takes or renews `holder`'s lease; False while `count` others hold theirs."""
        now = time.monotonic()
        self._expiry = {h: t for h, t in self._expiry.items() if t > now}
        if holder not in self._expiry and len(self._expiry) >= self._count:
            return False
        self._expiry[holder] = now + LEASE_S
        return True

    def give_back(self, holder: str) -> None:
        self._expiry.pop(holder, None)


TrialSlots = ray.remote(num_cpus=0)(Leases)  # the sweep's: one process keeps the count


def trial_slots(sweep: str, count: int) -> ray.actor.ActorHandle:
    """The trial slots of the sweep whose Tune experiment is at `sweep` (a path or URL): created, with
    `count` slots, by the first process to ask (the sweep's, which holds it until its trials end), found
    by the others. On the head, with the sweep and the trials' drivers: a worker host lost or drained
    would take it down with it."""
    name = "orchestrator-slots-" + hashlib.sha1(sweep.encode()).hexdigest()[:12]
    return TrialSlots.options(name=name, get_if_exists=True, resources=ON_HEAD).remote(count)


@contextmanager
def slot(slots: ray.actor.ActorHandle, holder: str, count: int) -> Iterator[None]:
    """Holds one of the sweep's `count` slots for `holder` (waiting for one to be free), renewing it
    until the block ends."""
    waited = False
    while not ray.get(slots.take.remote(holder)):
        if not waited:
            log.info("trial %s waits for a free slot (resources.max_concurrent_trials: %d)", holder, count)
            waited = True
        time.sleep(WAIT_S)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_S):
            slots.take.remote(holder)

    renewer = threading.Thread(target=renew, name="trial-slot", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        ray.get(slots.give_back.remote(holder))
