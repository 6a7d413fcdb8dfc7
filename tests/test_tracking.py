"""tracking.log_epoch against a real SQLite MLflow store: an epoch's metrics and tags land together, once."""

from __future__ import annotations

from orchestrator import tracking


def test_an_epoch_is_logged_once_with_its_tags(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id

    assert tracking.log_epoch(run_id, {"epoch": 1, "val_miou": 0.5}, 1, uri, tags={"orchestrator.nodes": 2})
    # A restarted trial runs epoch 1 again, maybe on other nodes: the first attempt's record stands.
    assert not tracking.log_epoch(
        run_id, {"epoch": 1, "val_miou": 0.7}, 1, uri, tags={"orchestrator.nodes": 1}
    )
    assert tracking.log_epoch(run_id, {"epoch": 2, "val_miou": 0.6}, 2, uri)

    run = tracking.client(uri).get_run(run_id)
    history = tracking.client(uri).get_metric_history(run_id, "val_miou")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6)]
    assert run.data.tags["orchestrator.nodes"] == "2"
