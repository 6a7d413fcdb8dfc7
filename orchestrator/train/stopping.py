"""A rank's side of the sweep's stop requests (execution/stop_requests.py): whether its trial is asked to
stop, polled at every step without waiting, and why. Public Ray API only: the actor's handle comes in the
loop's config."""

from __future__ import annotations

import ray


class Stopped(Exception):
    """A trial the sweep's scheduler stopped: its message says who, and when."""


class StopRequest:
    """One rank's view of its trial's stop request: polled at every step without waiting."""

    def __init__(self, requests: ray.actor.ActorHandle, key: str) -> None:
        self._answer = requests.wait.remote(key)

    @classmethod
    def of(cls, requests: ray.actor.ActorHandle | None, key: str) -> StopRequest | None:
        return None if requests is None else cls(requests, key)

    def flag(self) -> float:
        """1.0 once the trial is asked to stop, else 0.0 (the step's all-reduce sums the ranks')."""
        ready, _ = ray.wait([self._answer], timeout=0)
        return 1.0 if ready else 0.0

    def reason(self, timeout_s: float = 10) -> str:
        """Who asked, and when; a rank that learnt of the request from another waits for its own answer."""
        try:
            return ray.get(self._answer, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return "stopped by the sweep's scheduler"
