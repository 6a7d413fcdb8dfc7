"""tracking against a real SQLite MLflow store: epochs logged once, datasets as inputs, ensemble ranking."""

from __future__ import annotations

import json
from dataclasses import astuple

import pytest

from orchestrator import tracking
from orchestrator.data.shards import pack, read_manifest
from orchestrator.data.synth import synthesize


def test_an_epoch_is_logged_once_with_its_tags(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id

    assert tracking.log_epoch(run_id, {"val_miou": 0.5}, 1, uri, tags={"orchestrator.nodes": 2})
    # A restarted trial runs epoch 1 again, maybe on other nodes: the first attempt's record stands.
    assert not tracking.log_epoch(run_id, {"val_miou": 0.7}, 1, uri, tags={"orchestrator.nodes": 1})
    assert tracking.log_epoch(run_id, {"val_miou": 0.6}, 2, uri)

    run = tracking.client(uri).get_run(run_id)
    history = tracking.client(uri).get_metric_history(run_id, "val_miou")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.6)]
    assert run.data.tags["orchestrator.nodes"] == "2"


def test_a_metrics_history_gives_its_best_last_epoch_and_last_gain_over_finite_values(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment("e", uri)
    rising, diverged = (c.create_run(exp).info.run_id for _ in range(2))
    for epoch, value in [(3, 0.52), (1, 0.2), (2, 0.5)]:  # logged out of order
        c.log_metric(rising, "val_miou", value, step=epoch)
    for epoch, value in [(1, 0.2), (2, 0.5), (3, float("nan"))]:  # the last epoch diverged
        c.log_metric(diverged, "val_miou", value, step=epoch)
    assert astuple(tracking.metric_history(rising, "val_miou", uri)) == pytest.approx((0.52, 3, 0.02))
    assert astuple(tracking.metric_history(diverged, "val_miou", uri)) == pytest.approx((0.5, 3, 0.3))
    assert tracking.metric_history(rising, "none", uri) == tracking.MetricHistory(None, None, None)


def test_ensemble_candidates_are_ranked_by_best_value_and_a_configuration_counts_once(tmp_path) -> None:
    """A sweep run twice trains each configuration twice: the second copy of a configuration is no new
    member (an ensemble of one model's copies is that model); one without a checkpoint is none at all."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment("e", uri)
    (tmp_path / tracking.CHECKPOINT_FILE).write_bytes(b"weights")

    def trial(sweep: str, key: str, params: dict, history: list[float], checkpoint: bool = True) -> str:
        run_id = tracking.start_trial_run(exp, sweep, key, params, uri)
        for epoch, value in enumerate(history, 1):
            tracking.log_epoch(run_id, {"val_miou": value}, epoch, uri)
        if checkpoint:
            tracking.client(uri).log_artifact(
                run_id, str(tmp_path / tracking.CHECKPOINT_FILE), tracking.CHECKPOINT_DIR
            )
        tracking.end_run(run_id, uri)
        return run_id

    first, again = (tracking.start_sweep_run(exp, "s", {}, uri) for _ in range(2))
    bn, gn, gn_seed1 = {"norm": "bn"}, {"norm": "gn", "train.seed": 0}, {"norm": "gn", "train.seed": 1}
    bn_1 = trial(first, "norm=bn", bn, [0.5, 0.7, 0.6])  # ranked by its best epoch, not its last
    bn_2 = trial(again, "norm=bn", bn, [0.5, 0.7, 0.6])  # the same configuration, as good: the latest stands
    gn_1 = trial(first, "norm=gn", gn, [0.4])
    gn_2 = trial(again, "norm=gn", gn, [0.65])  # the better copy of gn stands for it
    trial(first, "norm=gn,seed=1", gn_seed1, [0.9], checkpoint=False)
    seed_1 = trial(again, "norm=gn,seed=1", gn_seed1, [0.3])

    ranked = tracking.top_trial_runs("e", "val_miou", 5, uri)
    assert [(run.info.run_id, best) for run, best in ranked] == [(bn_2, 0.7), (gn_2, 0.65), (seed_1, 0.3)]
    assert {bn_1, gn_1}.isdisjoint(run.info.run_id for run, _ in ranked)
    assert [run.info.run_id for run, _ in tracking.top_trial_runs("e", "val_miou", 2, uri)] == [bn_2, gn_2]


def test_a_runs_splits_are_its_dataset_inputs_with_a_digest_of_their_manifest(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    synthesize(str(tmp_path / "synth"), train=4, val=2, size=(32, 18))
    pack(str(tmp_path / "synth"), str(tmp_path / "shards"), shard_size=2, workers=1)
    pack(str(tmp_path / "synth"), str(tmp_path / "other"), shard_size=4, workers=1)
    splits = {
        context: (str(tmp_path / "shards" / split), read_manifest(str(tmp_path / "shards" / split)))
        for context, split in (("training", "train"), ("validation", "val"))
    }
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id
    tracking.log_datasets(run_id, splits, uri)
    tracking.log_datasets(run_id, splits, uri)  # a restarted trial logs them again: still one each

    inputs = tracking.client(uri).get_run(run_id).inputs.dataset_inputs
    logged = {i.tags[0].value: i.dataset for i in inputs}
    assert len(inputs) == 2 and [t.key for i in inputs for t in i.tags] == ["mlflow.data.context"] * 2
    assert {c: (d.name, json.loads(d.source), d.source_type) for c, d in logged.items()} == {
        "training": ("shards/train", {"uri": str(tmp_path / "shards" / "train")}, "local"),
        "validation": ("shards/val", {"uri": str(tmp_path / "shards" / "val")}, "local"),
    }
    assert json.loads(logged["training"].profile) == {"num_samples": 4, "num_shards": 2}
    # The digest follows the shards: the same samples packed in other shards are another dataset.
    other = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id
    repacked = read_manifest(str(tmp_path / "other" / "train"))
    tracking.log_datasets(other, {"training": ("other/train", repacked)}, uri)
    (again,) = tracking.client(uri).get_run(other).inputs.dataset_inputs
    digests = {logged["training"].digest, logged["validation"].digest, again.dataset.digest}
    assert len(digests) == 3 and all(len(d) == 8 and int(d, 16) >= 0 for d in digests)


def test_attempts_are_charged_to_their_trial_and_summed_on_the_sweep(tmp_path) -> None:
    """Each attempt adds workers x wall to worker_seconds and x GPUs to gpu_seconds; dollars follow the GPU
    the trial tagged, at its list price; a resumed sweep's driver goes on from the run's totals."""
    from orchestrator.gpus import GPUS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment("e", uri)
    sweep = tracking.start_sweep_run(exp, "s", {}, uri)
    gpu = tracking.start_trial_run(exp, sweep, "norm=bn", {}, uri)
    cpu = tracking.start_trial_run(exp, sweep, "norm=gn", {}, uri)
    tracking.log_attempt(gpu, uri, workers=4, gpus_per_worker=1, seconds=100.0)  # died before an epoch
    tracking.set_tags(gpu, {tracking.DEVICE: GPUS["a10g"].name}, uri)
    tracking.log_attempt(gpu, uri, workers=4, gpus_per_worker=1, seconds=50.0)
    tracking.log_attempt(cpu, uri, workers=2, gpus_per_worker=0, seconds=30.0)

    costs = tracking.trial_costs(sweep, uri)
    assert costs["norm=bn"] == {
        "attempts": 2, "restarts": 1, "worker_seconds": 600.0, "gpu_seconds": 600.0,
        "cost_usd": 600 / 3600 * GPUS["a10g"].usd_per_hour,
    }  # fmt: skip
    assert costs["norm=gn"] == {"attempts": 1, "restarts": 0, "worker_seconds": 60.0, "gpu_seconds": 0.0}
    history = tracking.client(uri).get_metric_history(gpu, "attempt_seconds")
    assert [(m.step, m.value) for m in history] == [(1, 100.0), (2, 50.0)]
    totals = tracking.sum_costs(exp, sweep, uri)
    assert totals == {
        "attempts": 3, "restarts": 1, "worker_seconds": 660.0, "gpu_seconds": 600.0,
        "cost_usd": costs["norm=bn"]["cost_usd"],
    }  # fmt: skip
    assert tracking.client(uri).get_run(sweep).data.metrics == totals


def test_a_resumed_trial_starts_without_the_verdict_of_the_attempt_before(tmp_path) -> None:
    """A driver that died after rank 0 said why the trial ended, before it ended the run: the trial runs
    again, and neither its outcome nor its reason may outlive the attempt that wrote them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment("e", uri)
    sweep = tracking.start_sweep_run(exp, "s", {}, uri)
    run_id = tracking.start_trial_run(exp, sweep, "base", {}, uri)
    tracking.end_early(run_id, "diverged", "loss nan at 3 steps in a row", uri)
    tracking.set_tags(run_id, {tracking.FAILURE: "an older failure"}, uri)
    assert tracking.start_trial_run(exp, sweep, "base", {}, uri) == run_id
    tags = tracking.client(uri).get_run(run_id).data.tags
    assert not {tracking.FAILURE, tracking.OUTCOME, tracking.ENDED_EARLY} & set(tags)
    assert tracking.end_trial_run(run_id, uri) == ("finished", None)


def test_runs_carry_their_short_name_the_full_key_and_mlflows_source_tags(tmp_path) -> None:
    """The UI's Source, Version and User columns: MLflow's fluent API fills them, a client's runs do not."""
    import getpass
    import subprocess
    from pathlib import Path

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment("e", uri)
    sweep = tracking.start_sweep_run(exp, "e", {}, uri)
    run_id = tracking.start_trial_run(exp, sweep, "norm=bn,train.batch_per_gpu=2", {}, uri, name="bn 2")
    run = tracking.client(uri).get_run(run_id)
    assert (
        run.info.run_name == "bn 2"
        and run.data.tags["orchestrator.trial_key"] == "norm=bn,train.batch_per_gpu=2"
    )
    package = Path(tracking.__file__).parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True).stdout
    for tags in (run.data.tags, tracking.client(uri).get_run(sweep).data.tags):
        assert tags["mlflow.source.name"] == "orchestrator" and tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.git.commit"] == commit.strip() != ""


def test_a_run_made_from_trials_is_linked_to_their_sweep_and_the_data_it_read(tmp_path) -> None:
    """An ensemble of one sweep's trials is nested under that sweep; a prediction from the ensemble too; an
    ensemble across two sweeps names both and nests under neither."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.ensure_experiment("e", uri)
    sweeps = [tracking.start_sweep_run(exp, "e", {}, uri) for _ in range(2)]
    a, b = (tracking.start_trial_run(exp, sweeps[0], key, {}, uri) for key in ("a", "b"))
    other = tracking.start_trial_run(exp, sweeps[1], "a", {}, uri)
    manifest = {"num_samples": 4, "shards": [{"name": "shard-000000.tar"}]}

    def derived(kind: str, sources: list[str], **kw) -> dict[str, str]:
        run_id = tracking.log_derived_run("e", kind, kind, {}, {}, uri=uri, sources=sources, **kw)
        return tracking.client(uri).get_run(run_id)

    ensemble = derived("ensemble", [a, b], data={"validation": ("s3://u:secret@bucket/val", manifest)})
    assert ensemble.data.tags["mlflow.parentRunId"] == sweeps[0]
    assert ensemble.data.tags["orchestrator.sweep_runs"] == sweeps[0]
    (dataset,) = ensemble.inputs.dataset_inputs
    assert "secret" not in dataset.dataset.source and dataset.tags[0].value == "validation"
    prediction = derived("prediction", [ensemble.info.run_id])
    assert prediction.data.tags["mlflow.parentRunId"] == sweeps[0]
    across = derived("ensemble", [a, other])
    assert across.data.tags["orchestrator.sweep_runs"] == ",".join(sorted(sweeps))
    assert "mlflow.parentRunId" not in across.data.tags
