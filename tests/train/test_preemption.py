"""A preemption notice is acted on at the next step boundary, once, by every rank together: a checkpoint there
where one fits in the time left (then the workers wait to be taken), a line saying so where none fits. The
multihost test (tests/execution/test_multihost.py) drains a real Ray node."""

from __future__ import annotations

import math

import pytest
from tiny_worker import tiny_worker

from orchestrator import tracking
from orchestrator.checkpoints import model_for
from orchestrator.train import loop, preemption
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch
from orchestrator.train.preemption import Notices, fits


@pytest.fixture
def worker(tiny_shards) -> Worker:
    return tiny_worker(tiny_shards, "notice", epochs=2, batch_per_gpu=1, crop=[32, 32], checkpoint_every=3)


def test_a_notice_is_taken_at_the_next_step_once(worker) -> None:
    """A notice that comes during step 2 is seen at its end, and a notice acted on is not seen again."""
    steps = iter(range(100))
    model = model_for(worker.spec)
    notices = Notices(lambda: 20.0 if next(steps) >= 1 else None)  # asked once a step: from the 2nd on
    seen, saved = [], []

    def noticed(p: Position) -> None:
        seen.append((p.epoch, p.step))
        notices.acted = True

    optimizer = make_optimizer(worker.spec.train, model)
    train_epoch(worker, model, optimizer, Position(), saved.append, None, noticed, notices)
    assert seen == [(0, 2)]
    assert [(p.epoch, p.step) for p in saved] == [(0, 3), (0, 6)]  # checkpoint_every goes on as before
    assert saved[0].loss_sum > 0


def test_a_notice_checkpoints_where_one_fits_and_says_where_none_does(worker, tmp_path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id
    config = {"mlflow_run_id": run_id, "tracking_uri": uri}
    waited, saved = [], []
    monkeypatch.setattr(Notices, "await_reclaim", staticmethod(waited.append))
    at = Position(epoch=1, step=2)

    def save(p: Position, preempted: bool = False) -> None:
        saved.append((p, preempted))

    notices = Notices(lambda: 14.0, checkpoint_s=3.0)
    loop._on_notice(worker, config, notices, save, at)
    assert saved == [(at, True)] and notices.acted and len(waited) == 1 and 13 < waited[0] <= 14
    tag = tracking.client(uri).get_run(run_id).data.tags[tracking.PREEMPTION]
    steps = worker.epoch_steps[0] + 2
    where = f"epoch 2 step 2 (step {steps} of the trial)"
    assert tag.startswith(f"preemption notice 14 s before the node goes: checkpointed at {where} in ")

    saved.clear()
    loop._on_notice(worker, config, Notices(lambda: 5.0, checkpoint_s=3.0), save, at)
    assert saved == [] and len(waited) == 1
    assert tracking.client(uri).get_run(run_id).data.tags[tracking.PREEMPTION] == (
        f"preemption notice 5.0 s before the node goes, at {where}: too short for a checkpoint (the last "
        "took 3.0 s); a restart goes back to the last checkpoint"
    )


def test_a_resumed_notice_checkpoint_counts_a_preemption(worker, tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id
    config = {"mlflow_run_id": run_id, "tracking_uri": uri}
    loop._log_resume(worker, config, Position(epoch=0, step=3), preempted=False)  # a crash: no preemption
    loop._log_resume(worker, config, Position(epoch=1, step=1), preempted=True)
    loop._log_resume(worker, config, Position(epoch=1, step=4), preempted=True)
    history = tracking.client(uri).get_metric_history(run_id, "preemptions")
    steps = worker.epoch_steps[0]
    assert [(m.step, m.value) for m in history] == [(steps + 1, 1.0), (steps + 4, 2.0)]


def test_a_resumed_attempt_counts_the_steps_the_one_before_did_past_its_checkpoint(worker, tmp_path) -> None:
    """Lost steps: how far the attempt before got (its ledger entry, where a rank lived to say) past the
    step this one resumes at (0 for one from scratch, which follows one that died before any checkpoint);
    an attempt no rank answered for is not counted."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id
    config = {"mlflow_run_id": run_id, "tracking_uri": uri}
    loop._log_resume(worker, config, Position(), preempted=False, fresh=True)  # the first attempt: nothing
    assert tracking.client(uri).get_run(run_id).data.metrics == {}
    for reached, resumed in [(2, None), (7, 3), (None, 5), (9, 9)]:  # None: started afresh
        tracking.log_attempt(run_id, uri, workers=2, gpus_per_worker=0, seconds=10.0, steps=reached)
        at = Position(epoch=0, step=resumed or 0)
        loop._log_resume(worker, config, at, preempted=False, fresh=resumed is None)
    history = tracking.client(uri).get_metric_history(run_id, "lost_steps")
    assert [m.value for m in history] == [2.0, 6.0, 6.0]


@pytest.mark.parametrize(
    ("left", "acted", "unheeded"), [(None, False, None), (3.0, False, 3.0), (3.0, True, None)]
)
def test_the_controller_hears_of_a_notice_no_step_got_to(left, acted, unheeded) -> None:
    """What a rank tells Ray Train's controller at its attempt's end: a notice it holds and never acted on
    (the node went before a step ended), so that the run still says what became of it."""
    progress = loop.Progress(steps=5, notices=Notices(lambda: left, acted=acted))
    assert progress.unheeded_notice_s() == unheeded
    assert loop.Progress().unheeded_notice_s() is None  # before the attempt's loop starts


@pytest.mark.parametrize(
    ("left", "waited"),
    [(10.0, 10 + preemption.RECLAIM_MARGIN_S), (-2.0, preemption.RECLAIM_MARGIN_S),
     (math.inf, preemption.NO_DEADLINE_WAIT_S)],
)  # fmt: skip
def test_waiting_to_be_taken_ends_past_the_deadline_or_a_drain_without_one(left, waited) -> None:
    now = [0.0]
    Notices.await_reclaim(left, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert now[0] == pytest.approx(waited)


def test_a_checkpoint_fits_with_room_for_one_as_long_again() -> None:
    assert fits(10.0, 4.9) and not fits(10.0, 5.0) and fits(math.inf, 100.0)
    assert fits(1.0, 0.0)  # no checkpoint yet this attempt: try
