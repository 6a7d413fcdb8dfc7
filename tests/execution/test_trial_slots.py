"""The sweep's trial slots (execution/trial_slots.py): a lease per running trial, and a lapsed lease free
again. The whole path, a resumed sweep held to its limit, is tested in test_trial_faults.py."""

from __future__ import annotations

import pytest
import ray
from ray.util.state import list_actors

from orchestrator.execution import trial_slots
from orchestrator.execution.ray_private import ON_HEAD
from orchestrator.execution.stop_requests import stop_requests
from orchestrator.execution.trial_slots import LEASE_S, Leases


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(trial_slots.time, "monotonic", lambda: now[0])
    return now


def test_a_slot_is_taken_by_one_holder_at_a_time_and_given_back(clock: list[float]) -> None:
    slots = Leases(1)
    assert slots.take("a") and not slots.take("b")
    assert slots.take("a")  # a renewal, not a second slot
    slots.give_back("a")
    assert slots.take("b") and not slots.take("a")


def test_each_of_count_slots_holds_one_trial(clock: list[float]) -> None:
    slots = Leases(2)
    assert [slots.take(h) for h in "abc"] == [True, True, False]


def test_a_lease_not_renewed_lapses_and_a_renewed_one_does_not(clock: list[float]) -> None:
    slots = Leases(2)
    assert slots.take("dead") and slots.take("alive")
    clock[0] += LEASE_S * 0.9
    assert slots.take("alive") and not slots.take("waiting")
    clock[0] += LEASE_S * 0.2  # past the dead holder's expiry, within the renewed one's
    assert slots.take("waiting") and not slots.take("another")


def test_the_sweeps_actors_live_on_the_head_with_it() -> None:
    """A worker host drained or lost must not take the sweep's slots or stop requests with it (a multi-host
    CI run lost its trial so: tests/execution/test_multihost.py's drained host held them)."""
    ray.init(num_cpus=1)
    try:
        held = [trial_slots.trial_slots("s3://b/sweep", 1), stop_requests("s3://b/sweep")]
        ray.get(held[0].take.remote("trial"))
        # By address: the state API finds no instance on its own where another Ray runs on the host.
        here = ray.get_runtime_context().gcs_address
        actors = list_actors(here, filters=[("state", "=", "ALIVE")], detail=True)
        needs = {a.class_name: a.required_resources for a in actors}
        (head,) = ON_HEAD
        assert needs["Leases"][head] == needs["StopRequests"][head] == ON_HEAD[head]
    finally:
        ray.shutdown()
